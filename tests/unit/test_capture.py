"""What `capture` finds in model code written in unusual ways, and what the quantized model
then computes (each case a bug once)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.parametrizations
import torch.nn.utils.prune
from torch import Tensor, nn

from fddaq.config import QuantConfig
from fddaq.errors import ModelError
from fddaq.quant.calibrate import calibrate_min_max
from fddaq.quant.capture import capture
from fddaq.quant.fold import fold_batch_norms
from fddaq.quant.modules import observing, switched_off
from fddaq.quant.plan import LayerPlan, LayerPlanEntry, resolve_layer_plan
from fddaq.quant.prepare import prepare

X = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def quantized(model: nn.Module, bits: int = 8):
    torch.manual_seed(0)
    found = capture(model.eval(), X[:2])
    qmodel = prepare(model, found, resolve_layer_plan(found, QuantConfig(bits, bits)), found.outputs[0].name)
    calibrate_min_max(qmodel, X)
    return found, qmodel


def close_to_fake_quant(qmodel) -> None:
    """The deployed model computes what the fake-quant model computes (up to the bias rounding)."""
    with torch.no_grad():
        expected, got = qmodel(X), fold_batch_norms(qmodel)(X)
    assert (got - expected).abs().max().item() < 0.05 * expected.abs().max().item()


class SharedWeight(nn.Module):
    """One weight, two calls with different biases."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.other_bias = nn.Parameter(torch.full((4,), 5.0))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) + F.conv2d(x, self.conv.weight, self.other_bias, padding=1)


def test_a_weight_shared_by_calls_with_their_own_biases():
    found, qmodel = quantized(SharedWeight())
    assert [(layer.name, layer.calls) for layer in found.layers] == [("conv", 2)]
    close_to_fake_quant(qmodel)


class Returned(nn.Module):
    """A conv output that the model returns, and one written into a buffer, besides their BNs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.b, self.bn_b = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.c, self.bn_c = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.a(x)
        y = self.b(x)
        buffer = torch.zeros(x.shape[0], 8, 6, 6)
        buffer[:, :4] = y
        return self.bn_a(features) + self.bn_b(y) + self.bn_c(self.c(x)) + buffer[:, 4:], features


def test_batch_norms_fold_only_into_outputs_nothing_else_uses():
    model = Returned()
    with torch.no_grad():
        for bn in (model.bn_a, model.bn_b, model.bn_c):
            bn.running_var.fill_(4.0)
            bn.running_mean.fill_(1.0)
    found, qmodel = quantized(model)
    assert [fold.layer for fold in found.folds] == ["c"]
    close_to_fake_quant(qmodel)


class TwoInputs(nn.Module):
    """A layer called on a clipped input and on an unclipped one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Conv2d(3, 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.relu6(x)) + self.conv(100 * x) + self.head(F.hardtanh(x, -1.0, 2.0)) + self.head(F.relu6(x))


def test_clip_bounds_hold_for_every_call_of_a_layer():
    found, qmodel = quantized(TwoInputs())
    assert found.clips == {"head": (-1.0, 6.0)}  # conv's second input is not clipped: no bounds
    close_to_fake_quant(qmodel)


class FrozenBatchNorm(nn.Module):
    """detectron2-style: statistics and affine in buffers."""

    def __init__(self, n: int) -> None:
        super().__init__()
        for name, value in (("weight", 1.5), ("bias", 0.2), ("running_mean", 0.1), ("running_var", 2.0)):
            self.register_buffer(name, torch.full((n,), value))

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, 1e-5)


def test_a_frozen_batch_norm_with_buffers_folds():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm(4), nn.ReLU())
    found, qmodel = quantized(model)
    assert [(fold.layer, fold.weight) for fold in found.folds] == [("0", "1.weight")]
    close_to_fake_quant(qmodel)


def test_pruned_and_parametrized_weights_are_their_modules_layers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    torch.nn.utils.prune.l1_unstructured(model[0], "weight", amount=0.5)
    torch.nn.utils.parametrizations.weight_norm(model[1])
    found, qmodel = quantized(model)
    assert [(layer.name, layer.weight) for layer in found.layers] == [("0", None), ("1", None)]
    trained = {id(p) for p in qmodel.trainable_weights()}
    assert id(qmodel.model[0].weight_orig) in trained and id(qmodel.model[0].bias) in trained
    assert all(isinstance(p, nn.Parameter) for p in qmodel.trainable_weights())  # not the pruning mask
    close_to_fake_quant(qmodel)


def test_reading_the_weights_runs_no_quantizer_and_keeps_modes():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    torch.nn.utils.parametrizations.weight_norm(model[1])  # a computed weight: read by a forward
    _, qmodel = quantized(model)
    quantizer = qmodel.quant_layer("1").input_quant
    quantizer.set_observed(-1.0, 3.0)
    qmodel.train()
    with observing([quantizer], 0.9):
        qmodel.layer_weights()
    assert quantizer.observed_range() == (-1.0, 3.0) and qmodel.training and qmodel.model[0].training


def test_modes_hold_for_a_block_and_the_observed_range_is_state():
    _, qmodel = quantized(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)))
    layer, quantizer = qmodel.layers[1], qmodel.layers[1].input_quant
    layer.enabled = False  # a layer already off stays off
    with pytest.raises(RuntimeError, match="inside"):
        with switched_off([qmodel.layers[0], layer]), observing([quantizer], 0.5):
            assert not qmodel.layers[0].enabled and quantizer.ema_momentum == 0.5
            raise RuntimeError("inside")
    assert qmodel.layers[0].enabled and not layer.enabled and quantizer.ema_momentum is None
    layer.enabled = True
    assert quantizer.observed_range() is None
    with observing([quantizer], 0.5):
        qmodel(X[:2])
    seen = quantizer.observed_range()
    assert seen is not None and seen[1] > 0 >= seen[0]
    state = qmodel.state_dict()  # a resumed run reads the observer back from the state dict
    _, other = quantized(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)))
    other.load_state_dict(state)
    assert other.layers[1].input_quant.observed_range() == seen


class Flipped(nn.Module):
    """One parameter used as it is and flipped: two layers."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight) + F.conv2d(x, self.weight.flip(-1))


def test_a_weight_used_directly_and_computed_makes_two_layers():
    found, qmodel = quantized(Flipped())
    assert [(layer.name, layer.weight) for layer in found.layers] == [("weight", "weight"), ("weight#2", None)]
    qmodel.outputs = {}
    with torch.no_grad():
        qmodel(X)
    assert set(qmodel.outputs) == {"weight", "weight#2"}  # both calls quantized


def test_a_plan_naming_layers_the_model_lacks_is_a_model_error():
    found = capture(nn.Sequential(nn.Conv2d(3, 4, 3)).eval(), X[:1])
    plan = LayerPlan((LayerPlanEntry("gone", "conv2d", 4, 4, "default bits"),))
    with pytest.raises(ModelError, match="the layer plan names layers the model does not compute: gone"):
        prepare(nn.Sequential(nn.Conv2d(3, 4, 3)), found, plan, "logits")
