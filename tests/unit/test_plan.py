import pytest
import torch
from torch import nn

from fddaq.config import QuantConfig
from fddaq.errors import ConfigError
from fddaq.quant.capture import capture
from fddaq.quant.plan import LayerPlan, resolve_layer_plan
from fddaq.quant.prepare import prepare


def captured(model: nn.Module, shape=(1, 16, 16)):
    return capture(model, torch.zeros(1, *shape))


def test_all_layers_at_requested_bits_first_input_at_8(tiny_model):
    plan = resolve_layer_plan(captured(tiny_model), QuantConfig(weight_bits=4, act_bits=4))
    bits = {e.name: (e.weight_bits, e.act_bits) for e in plan.layers}
    assert bits == {"conv1": (4, 8), "conv2": (4, 4), "short": (4, 4), "fc": (4, 4)}
    assert [e.name for e in plan.layers] == ["conv1", "conv2", "short", "fc"]  # execution order


def test_first_last_bits(tiny_model):
    plan = resolve_layer_plan(captured(tiny_model), QuantConfig(4, 4, first_last_bits=8))
    bits = {e.name: (e.weight_bits, e.act_bits) for e in plan.layers}
    assert bits["conv1"] == (8, 8) and bits["fc"] == (8, 8) and bits["conv2"] == (4, 4)
    assert "first layer" in plan.layers[0].reason


def test_plan_json_round_trip(tiny_model):
    plan = resolve_layer_plan(captured(tiny_model), QuantConfig())
    assert LayerPlan.from_json(plan.to_json()) == plan


def test_weight_grids(tiny_model):
    """auto: affine at 4 bits and fewer, symmetric wider; symmetric everywhere on request; a plan
    saved without grids gets the auto ones; the prepared quantizers follow the plan."""
    found = captured(tiny_model)
    auto = resolve_layer_plan(found, QuantConfig(4, 4, first_last_bits=8))
    assert {e.name: e.weight_grid for e in auto.layers} == {
        "conv1": "symmetric", "conv2": "affine", "short": "affine", "fc": "symmetric"}
    symmetric = resolve_layer_plan(found, QuantConfig(4, 4, weight_grid="symmetric"))
    assert {e.weight_grid for e in symmetric.layers} == {"symmetric"}
    old = [{k: v for k, v in entry.items() if k != "weight_grid"} for entry in auto.to_json()]
    assert LayerPlan.from_json(old) == auto
    qmodel = prepare(tiny_model, found, symmetric, found.outputs[0].name)
    assert all(not layer.weight_quant.affine for layer in qmodel.layers)
    assert prepare(tiny_model, found, auto, found.outputs[0].name).quant_layer("conv2").weight_quant.affine
    with pytest.raises(ConfigError, match="weight_grid"):
        QuantConfig(weight_grid="asymmetric")


class PaddedConv(nn.Conv2d):
    """A conv subclass with its own forward (like EfficientNet-PyTorch's static 'same' padding)."""

    def forward(self, x):
        return nn.functional.conv2d(nn.functional.pad(x, (0, 1, 0, 1)), self.weight, self.bias)


class Functional(nn.Module):
    """Weights used by F.linear directly, and one by torch.matmul (not a layer fddaq quantizes)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Parameter(torch.randn(5, 2 * 15 * 15))
        self.mix = nn.Parameter(torch.randn(5, 3))

    def forward(self, x):
        return torch.matmul(nn.functional.linear(x, self.proj), self.mix)


def test_layers_are_found_by_what_they_compute_not_by_class():
    model = nn.Sequential(PaddedConv(1, 2, 3), nn.Flatten(), Functional()).eval()
    plan = resolve_layer_plan(captured(model), QuantConfig())
    kinds = {e.name: (e.kind, e.reason) for e in plan.layers}
    assert kinds["0"][0] == "conv2d" and kinds["2.proj"][0] == "linear"
    assert kinds["2.mix"][0] == "float" and "torch.matmul" in kinds["2.mix"][1]
    assert [e.name for e in plan.quantized] == ["0", "2.proj"]
    with pytest.raises(ConfigError, match=r"2.mix cannot be quantized \(kept float: its weight is used by torch.matmul"):
        resolve_layer_plan(captured(model), QuantConfig(layers=("2.mix=8",)))


def test_prepare_keeps_the_float_model_and_its_classes(tiny_model):
    found = captured(tiny_model)
    qmodel = prepare(tiny_model, found, resolve_layer_plan(found, QuantConfig()), "logits")
    assert type(qmodel.model.conv1) is nn.Conv2d and qmodel.model is not tiny_model
    assert torch.equal(qmodel.model.short.bias, tiny_model.short.bias)
    assert qmodel.quant_layer("conv1").input_quant.bits == 8 and qmodel.quant_layer("conv2").weight_quant.bits == 4


def test_override_matching_nothing_and_float_override(tiny_model):
    found = captured(tiny_model)
    with pytest.raises(ConfigError, match="'conv9=8' matches no layer; layers: conv1, conv2, short, fc"):
        resolve_layer_plan(found, QuantConfig(layers=("conv9=8",)))
    plan = resolve_layer_plan(found, QuantConfig(layers=("short=float", "fc=8/4")))
    entries = {e.name: e for e in plan.layers}
    assert entries["short"].kind == "float" and (entries["fc"].weight_bits, entries["fc"].act_bits) == (8, 4)
    # everything float is refused when the plan is made, not after calibration ("use export_float")
    with pytest.raises(ConfigError, match=r"no layer is left to quantize: every layer is kept float \(layer overrides: '\*=float'\)"):
        resolve_layer_plan(found, QuantConfig(layers=("*=float",)))


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
    model = Clipped().eval()
    found = captured(model)
    qmodel = prepare(model, found, resolve_layer_plan(found, QuantConfig(8, 8)), "logits")
    bounds = {name: qmodel.quant_layer(name).input_quant.bounds for name in ("stem", "conv", "other", "fc")}
    assert bounds == {"stem": None, "conv": (0.0, 6.0), "other": (-2.0, 3.0), "fc": None}
    conv, other = qmodel.quant_layer("conv").input_quant, qmodel.quant_layer("other").input_quant
    conv.set_params(10 / 255, 0.0)  # as if fine-tuning had grown the step
    assert 255 * conv.scale().item() <= 6.0 and 255 * conv.scale().item() > 6.0 - 1e-4
    top = torch.tensor(255.0) * conv.scale().float()  # what a runtime computes, in float32
    assert top.item() <= 6.0
    other.set_params(0.05, 100.0)  # grid -5 .. 7.75: capped by both ends
    low, high = (0 - 100) * other.scale().item(), (255 - 100) * other.scale().item()
    assert -2.0 <= low and high <= 3.0 and high > 3.0 - 1e-4
    conv.set_params(0.01, 0.0)  # inside: untouched
    assert conv.scale().item() == pytest.approx(0.01)
