"""BatchNorm folding into convolutions (the deployed form) and int32 bias simulation."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from fddaq.quant.fold import fold_batch_norms, foldable_pairs
from fddaq.quant.modules import FakeQuantConv2d, FakeQuantLinear
from fddaq.quant.primitives import activation_params


def random_batch_norm(bn: nn.BatchNorm2d, generator: torch.Generator) -> None:
    n = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(0.3 * torch.randn(n, generator=generator))
        bn.running_var.copy_(0.2 + torch.rand(n, generator=generator))
        bn.weight.copy_(torch.randn(n, generator=generator))  # negative gammas too
        bn.bias.copy_(0.3 * torch.randn(n, generator=generator))


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
    model = Net()
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            random_batch_norm(module, generator)
    return model.eval()


def test_foldable_pairs_are_single_reader_single_call():
    assert foldable_pairs(net()) == [("conv1", "bn1")]


def test_folded_float_model_computes_the_same():
    model = net()
    folded = fold_batch_norms(model)
    assert isinstance(folded.bn1, nn.Identity) and isinstance(model.bn1, nn.BatchNorm2d)
    assert isinstance(folded.bn2, nn.BatchNorm2d) and isinstance(folded.bn3, nn.BatchNorm2d)
    x = torch.randn(8, 3, 10, 10, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    assert foldable_pairs(folded) == []
    assert fold_batch_norms(folded).state_dict().keys() == folded.state_dict().keys()  # idempotent


def fake_quant_conv_bn(gamma: list[float], weight_rows: dict[int, float] | None = None) -> nn.Sequential:
    conv = FakeQuantConv2d(2, len(gamma), 3, bias=False, weight_bits=4, act_bits=4)
    bn = nn.BatchNorm2d(len(gamma), eps=1e-3)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator))
        for row, value in (weight_rows or {}).items():
            conv.weight[row] = value
        conv.weight_quant.set_scale(conv.weight_quant.min_max_scale(conv.weight))
        conv.input_quant.set_params(*activation_params(-2.0, 2.0, 4))
        bn.weight.copy_(torch.tensor(gamma))
        bn.bias.copy_(torch.linspace(-0.5, 0.5, len(gamma)))
        bn.running_mean.copy_(torch.linspace(0.1, -0.1, len(gamma)))
        bn.running_var.copy_(torch.linspace(0.5, 2.0, len(gamma)))
        bn.running_var[1] = 0.0  # the module's eps counts
    return nn.Sequential(conv, bn).eval()


def test_fake_quant_fold_keeps_integers_and_moves_signs():
    model = fake_quant_conv_bn([0.8, -1.3, 0.0, 2.0], weight_rows={3: 0.0})
    conv = model[0]
    integers = conv.weight_quant.quantize(conv.weight)
    folded = fold_batch_norms(model)[0]
    new = folded.weight_quant.quantize(folded.weight)
    torch.testing.assert_close(new[0], integers[0], rtol=0, atol=0)
    torch.testing.assert_close(new[1], -integers[1], rtol=0, atol=0)  # negative gamma
    assert not new[2:].any()  # gamma 0 and all-zero weights: the bias alone
    scale = folded.weight_quant.scale()
    assert torch.isfinite(scale).all() and (scale > 0).all()
    a = 1.3 / (0.0 + 1e-3) ** 0.5
    assert scale[1].item() == pytest.approx(a * conv.weight_quant.scale()[1].item(), rel=1e-6)
    # the folded weight is exactly its integers times the step size
    torch.testing.assert_close(folded.weight, new * scale.reshape(-1, 1, 1, 1), rtol=0, atol=0)


def test_fake_quant_fold_matches_the_unfolded_model():
    """Same integers, step sizes equal up to float32 rounding: the outputs agree except for
    rare values on a rounding boundary of the int32 bias."""
    model = fake_quant_conv_bn([0.8, -1.3, 0.0, 2.0], weight_rows={3: 0.0})
    folded = fold_batch_norms(model)
    x = torch.randn(16, 2, 12, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, got = model(x), folded(x)
    step = (folded[0].input_quant.scale() * folded[0].weight_quant.scale()).reshape(1, -1, 1, 1)
    assert ((got - expected).abs() <= step / 2 + 1e-5).all()  # at most the bias rounding
    # dead channels output their bias to within 2^-24 relative (their step is chosen for it)
    torch.testing.assert_close(got[:, 2:], expected[:, 2:], rtol=1e-6, atol=1e-7)


def test_bias_is_simulated_as_int32_at_input_times_weight_step():
    linear = FakeQuantLinear(3, 2, weight_bits=4, act_bits=4)
    with torch.no_grad():
        linear.weight.fill_(0.5)
        linear.bias.copy_(torch.tensor([0.123456, -0.987654]))
        linear.weight_quant.set_scale(torch.tensor([0.25, 0.5]))
        linear.input_quant.set_params(0.1, 0.0)
        out = linear(torch.zeros(1, 3))
    step = linear.input_quant.scale() * linear.weight_quant.scale()
    torch.testing.assert_close(out[0], torch.round(linear.bias / step) * step, rtol=0, atol=0)
    linear.input_quant.enabled = False  # observing float inputs: the float bias
    with torch.no_grad():
        torch.testing.assert_close(linear(torch.zeros(1, 3))[0], linear.bias.detach(), rtol=0, atol=0)



def test_all_zero_rows_of_an_unfolded_layer_keep_their_bias_exact():
    """A pruned Linear row (no BatchNorm to fold) outputs its bias alone: the deployed form gives
    it the step that makes the int32 bias exact to 2^-24, not the step calibration left."""
    linear = FakeQuantLinear(3, 3, weight_bits=4, act_bits=4)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[0.5, -0.25, 0.1], [0.0, 0.0, 0.0], [0.01, 0.0, -0.01]]))
        linear.bias.copy_(torch.tensor([0.123456, -0.987654, 0.345678]))
        linear.weight_quant.set_scale(torch.tensor([0.07, 1.0, 0.1]))  # row 2 rounds to all zeros
        linear.input_quant.set_params(0.1, 0.0)
    x = torch.tensor([[0.3, 0.8, 1.2]])
    with torch.no_grad():
        before = linear(x)[0]
        deployed = fold_batch_norms(linear)
        after = deployed(x)[0]
    assert before[0] == after[0]  # live rows: same integers, same steps, same output
    for row in (1, 2):
        assert abs(before[row] - linear.bias[row]) > 1e-3  # the coarse step s_in x s_w
        torch.testing.assert_close(after[row], linear.bias[row].detach(), rtol=2.0**-23, atol=0)
    assert not deployed.weight_quant.quantize(deployed.weight)[1:].any()
