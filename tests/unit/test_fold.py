"""BatchNorm folding into quantized layers (the deployed form) and int32 bias simulation."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from fddaq.config import QuantConfig
from fddaq.quant.capture import capture
from fddaq.quant.fold import fold_batch_norms
from fddaq.quant.modules import QuantizedModel
from fddaq.quant.plan import resolve_layer_plan
from fddaq.quant.prepare import prepare
from fddaq.quant.primitives import activation_params, weight_range
from tests.models import randomize_bn


class Net(nn.Module):
    """conv-BN (foldable), conv whose output also feeds the sum (its BN is not foldable), a
    conv called twice (never folded), and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.shared = nn.Conv2d(6, 6, 1)
        self.bn3 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        y = self.conv2(x)
        x = self.bn2(y) + y
        x = self.bn3(self.shared(self.shared(x)))
        return self.fc(x.mean((2, 3)))


def net() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(Net(), seed=1, negative_gammas=True)


def quantized(model: nn.Module, shape: tuple[int, ...], bits: int = 4) -> QuantizedModel:
    found = capture(model, torch.zeros(1, *shape))
    qmodel = prepare(model, found, resolve_layer_plan(found, QuantConfig(bits, bits)), found.outputs[0].name)
    weights = qmodel.layer_weights()
    for layer in qmodel.layers:
        layer.weight_quant.set_min_max(weights[layer.name])
        layer.input_quant.set_params(*activation_params(-2.0, 2.0, bits))
    return qmodel


def test_only_single_reader_single_call_batch_norms_fold():
    found = capture(net(), torch.zeros(1, 3, 8, 8))
    assert [(fold.layer, fold.running_mean) for fold in found.folds] == [("conv1", "bn1.running_mean")]
    assert found.layer("shared").calls == 2


def test_deployed_model_matches_the_fake_quant_model():
    """Same integers, step sizes equal up to float32 rounding: the outputs agree but for rare
    values on a rounding boundary (here at most one step of the last layer)."""
    qmodel = quantized(net(), (3, 10, 10))
    deployed = fold_batch_norms(qmodel)
    assert deployed.deployed and not qmodel.deployed
    assert deployed.folded_batch_norms() == ["bn1.running_mean"]
    x = torch.randn(8, 3, 10, 10, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = qmodel(x), deployed(x)
    fc = deployed.quant_layer("fc")
    step = (fc.input_quant.scale() * fc.weight_quant.scale()).max().item()
    assert (got - expected).abs().max().item() <= 2 * step
    again = fold_batch_norms(deployed).state_dict()  # idempotent: a deployed model is copied as it is
    assert again.keys() == deployed.state_dict().keys()
    assert all(torch.equal(again[key], value) for key, value in deployed.state_dict().items())


class ConvBatchNorm(nn.Module):
    def __init__(self, gamma: list[float]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, len(gamma), 3, bias=False)
        self.bn = nn.BatchNorm2d(len(gamma), eps=1e-3)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


def conv_bn(gamma: list[float], zero_rows: tuple[int, ...] = (), bits: int = 4) -> QuantizedModel:
    model = ConvBatchNorm(gamma).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.conv.weight.copy_(torch.randn(model.conv.weight.shape, generator=generator))
        for row in zero_rows:
            model.conv.weight[row] = 0.0
        model.bn.weight.copy_(torch.tensor(gamma))
        model.bn.bias.copy_(torch.linspace(-0.5, 0.5, len(gamma)))
        model.bn.running_mean.copy_(torch.linspace(0.1, -0.1, len(gamma)))
        model.bn.running_var.copy_(torch.linspace(0.5, 2.0, len(gamma)))
        model.bn.running_var[1] = 0.0  # the module's eps counts
    return quantized(model, (2, 12, 12), bits)


@pytest.mark.parametrize("bits", [4, 8])
def test_fold_keeps_integers_and_moves_signs(bits):
    """A negative gamma negates a channel's values: ``-q`` on the symmetric 8-bit grid, ``-1 - q``
    and zero point ``-1 - zp`` on the affine 4-bit grid (-8..7 has no +8)."""
    qmodel = conv_bn([0.8, -1.3, 0.0, 2.0], zero_rows=(3,), bits=bits)
    layer = qmodel.quant_layer("conv")
    integers = layer.weight_quant.quantize(qmodel.model.conv.weight)
    zero_point = layer.weight_quant.zero_point.clone()
    folded = fold_batch_norms(qmodel).quant_layer("conv")
    new, new_zero_point = folded.integers.float(), folded.weight_quant.zero_point
    assert layer.weight_quant.affine == (bits == 4)
    torch.testing.assert_close(new[0], integers[0], rtol=0, atol=0)
    if bits == 4:
        assert zero_point[1] != 0  # the channel's grid is not symmetric
        torch.testing.assert_close(new[1], -1 - integers[1], rtol=0, atol=0)  # negative gamma
        assert new_zero_point[1] == -1 - zero_point[1]
    else:
        torch.testing.assert_close(new[1], -integers[1], rtol=0, atol=0)
        assert not new_zero_point.any()
    assert not new[2:].any() and not new_zero_point[2:].any()  # gamma 0 and all-zero weights: the bias alone
    qmin, qmax = weight_range(bits)
    assert new.min() >= qmin and new.max() <= qmax
    scale = folded.weight_quant.scale()
    assert torch.isfinite(scale).all() and (scale > 0).all()
    a = 1.3 / (0.0 + 1e-3) ** 0.5
    assert scale[1].item() == pytest.approx(a * layer.weight_quant.scale()[1].item(), rel=1e-6)
    expected = (new - new_zero_point.reshape(-1, 1, 1, 1)) * scale.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(folded.deployed_weight(), expected, rtol=0, atol=0)
    # the value of the negated channel is minus the unfolded one, scaled by |a|
    unfolded = layer.weight_quant.dequantize(integers)
    torch.testing.assert_close(expected[1], -a * unfolded[1], rtol=1e-5, atol=1e-6)


def test_fold_matches_the_unfolded_model_and_dead_channels_keep_their_bias():
    qmodel = conv_bn([0.8, -1.3, 0.0, 2.0], zero_rows=(3,))
    folded = fold_batch_norms(qmodel)
    x = torch.randn(16, 2, 12, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, got = qmodel(x), folded(x)
    layer = folded.quant_layer("conv")
    step = (layer.input_quant.scale() * layer.weight_quant.scale()).reshape(1, -1, 1, 1)
    assert ((got - expected).abs() <= step / 2 + 1e-5).all()  # at most the bias rounding
    # dead channels output their bias to within 2^-24 relative (their step is chosen for it)
    torch.testing.assert_close(got[:, 2:], expected[:, 2:], rtol=1e-6, atol=1e-7)


def test_bias_is_simulated_as_int32_at_input_times_weight_step():
    qmodel = quantized(nn.Linear(3, 2).eval(), (3,))
    layer = qmodel.layers[0]
    linear = qmodel.model
    with torch.no_grad():
        linear.weight.fill_(0.5)
        linear.bias.copy_(torch.tensor([0.123456, -0.987654]))
        layer.weight_quant.set_scale(torch.tensor([0.25, 0.5]))
        layer.input_quant.set_params(0.1, 0.0)
        out = qmodel(torch.zeros(1, 3))
    step = layer.input_quant.scale() * layer.weight_quant.scale()
    torch.testing.assert_close(out[0], torch.round(linear.bias / step) * step, rtol=0, atol=0)
    layer.input_quant.enabled = False  # observing float inputs: the float bias
    with torch.no_grad():
        torch.testing.assert_close(qmodel(torch.zeros(1, 3))[0], linear.bias.detach(), rtol=0, atol=0)


def test_all_zero_rows_of_an_unfolded_layer_keep_their_bias_exact():
    """A pruned Linear row (no BatchNorm to fold) outputs its bias alone: the deployed form gives
    it the step that makes the int32 bias exact to 2^-24, not the step calibration left."""
    qmodel = quantized(nn.Linear(3, 3).eval(), (3,))
    layer, linear = qmodel.layers[0], qmodel.model
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[0.5, -0.25, 0.1], [0.0, 0.0, 0.0], [0.01, 0.0, -0.01]]))
        linear.bias.copy_(torch.tensor([0.123456, -0.987654, 0.345678]))
        layer.weight_quant.set_scale(torch.tensor([0.07, 1.0, 0.1]))  # row 2 rounds to all zeros
        layer.input_quant.set_params(0.1, 0.0)
    x = torch.tensor([[0.3, 0.8, 1.2]])
    with torch.no_grad():
        before = qmodel(x)[0]
        deployed = fold_batch_norms(qmodel)
        after = deployed(x)[0]
    assert before[0] == after[0]  # live rows: same integers, same steps, same output
    for row in (1, 2):
        assert abs(before[row] - linear.bias[row]) > 1e-3  # the coarse step s_in x s_w
        torch.testing.assert_close(after[row], linear.bias[row].detach(), rtol=2.0**-23, atol=0)
    assert not deployed.layers[0].integers[1:].any()
