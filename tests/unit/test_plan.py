import pytest
import torch
from torch import nn

from fddaq.config import QuantConfig
from fddaq.errors import ConfigError
from fddaq.quant.modules import FakeQuantConv2d, FakeQuantLinear
from fddaq.quant.plan import LayerPlan, resolve_layer_plan
from fddaq.quant.prepare import prepare

ORDER = ["conv1", "conv2", "short", "fc"]


def test_all_layers_at_requested_bits_first_input_at_8(tiny_model):
    plan = resolve_layer_plan(tiny_model, ORDER, QuantConfig(weight_bits=4, act_bits=4))
    bits = {e.name: (e.weight_bits, e.act_bits) for e in plan.layers}
    assert bits == {"conv1": (4, 8), "conv2": (4, 4), "short": (4, 4), "fc": (4, 4)}


def test_first_last_bits(tiny_model):
    plan = resolve_layer_plan(tiny_model, ORDER, QuantConfig(4, 4, first_last_bits=8))
    bits = {e.name: (e.weight_bits, e.act_bits) for e in plan.layers}
    assert bits["conv1"] == (8, 8) and bits["fc"] == (8, 8) and bits["conv2"] == (4, 4)
    assert "first layer" in plan.layers[0].reason


def test_plan_json_round_trip(tiny_model):
    plan = resolve_layer_plan(tiny_model, ORDER, QuantConfig())
    assert LayerPlan.from_json(plan.to_json()) == plan


def test_custom_forward_conv_stays_float_and_is_listed():
    class PaddedConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(nn.functional.pad(x, (0, 1, 0, 1)))

    model = nn.Sequential(PaddedConv(1, 2, 3), nn.Flatten(), nn.Linear(2 * 16, 3))
    plan = resolve_layer_plan(model, ["0", "2"], QuantConfig())
    assert plan.layers[0].kind == "float" and "overrides Conv2d.forward" in plan.layers[0].reason
    qmodel = prepare(model, plan)
    assert type(qmodel[0]) is PaddedConv and isinstance(qmodel[2], FakeQuantLinear)


def test_prepare_keeps_weights_and_float_model(tiny_model):
    plan = resolve_layer_plan(tiny_model, ORDER, QuantConfig())
    qmodel = prepare(tiny_model, plan)
    assert isinstance(qmodel.conv1, FakeQuantConv2d) and type(tiny_model.conv1) is nn.Conv2d
    assert torch.equal(qmodel.short.bias, tiny_model.short.bias)
    assert qmodel.conv1.input_quant.bits == 8 and qmodel.conv2.weight_quant.bits == 4


@pytest.mark.parametrize("field, value", [("weight_bits", 1), ("act_bits", 9), ("first_last_bits", 0)])
def test_bits_out_of_range(field, value):
    with pytest.raises(ConfigError, match=f"{field}={value} is outside the supported 2..8"):
        QuantConfig(**{field: value})


class Clipped(nn.Module):
    """Inputs clipped by ReLU6 (through zero padding and pooling), by F.hardtanh, and not at all."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3)
        self.relu6 = nn.ReLU6()
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.pool = nn.MaxPool2d(2)
        self.conv = nn.Conv2d(4, 4, 3)
        self.other = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.conv(self.pool(self.pad(self.relu6(self.stem(x)))))
        x = self.other(nn.functional.hardtanh(x, -2.0, 3.0))
        return self.fc(torch.relu(x).mean((2, 3)))


def test_clipped_inputs_cap_the_step_size_so_the_grid_stays_inside_the_clip():
    """onnxruntime removes Clip -> QuantizeLinear (and then runs integer kernels) only when the
    grid lies inside the clip; a learned step may not grow past that."""
    model = Clipped()
    order = ["stem", "conv", "other", "fc"]
    qmodel = prepare(model, resolve_layer_plan(model, order, QuantConfig(8, 8)))
    bounds = {name: qmodel.get_submodule(name).input_quant.bounds for name in order}
    assert bounds == {"stem": None, "conv": (0.0, 6.0), "other": (-2.0, 3.0), "fc": None}
    conv, other = qmodel.conv.input_quant, qmodel.other.input_quant
    conv.set_params(10 / 255, 0.0)  # as if fine-tuning had grown the step
    assert 255 * conv.scale().item() <= 6.0 and 255 * conv.scale().item() > 6.0 - 1e-4
    top = torch.tensor(255.0) * conv.scale().float()  # what a runtime computes, in float32
    assert top.item() <= 6.0
    other.set_params(0.05, 100.0)  # grid -5 .. 7.75: capped by both ends
    low, high = (0 - 100) * other.scale().item(), (255 - 100) * other.scale().item()
    assert -2.0 <= low and high <= 3.0 and high > 3.0 - 1e-4
    qmodel.conv.input_quant.set_params(0.01, 0.0)  # inside: untouched
    assert qmodel.conv.input_quant.scale().item() == pytest.approx(0.01)
