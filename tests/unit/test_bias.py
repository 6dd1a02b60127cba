"""Empirical bias correction: each layer's mean output error removed through its bias, folded
into the deployed bias (also of a layer that has none)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from fddaq.config import CalibrationConfig, QuantConfig
from fddaq.quant.bias import correct_biases
from fddaq.quant.calibrate import calibrate
from fddaq.quant.capture import capture
from fddaq.quant.fold import fold_batch_norms
from fddaq.quant.modules import QuantizedModel
from fddaq.quant.plan import resolve_layer_plan
from fddaq.quant.prepare import prepare


class Depthwise(nn.Module):
    """conv-BN-ReLU, a depthwise 3x3 without bias or BatchNorm, a pointwise conv, a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.pointwise = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.pointwise(self.depthwise(x)))
        return self.fc(x.mean(dim=(2, 3)))


def quantized(bits: int, bias_images: int, act_bits: int = 8) -> tuple[QuantizedModel, nn.Module, Tensor]:
    torch.manual_seed(0)
    model = Depthwise().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 1.5)
        model.depthwise.weight.add_(0.2)  # a skewed 9-weight channel rounds to a biased mean
    found = capture(model, torch.zeros(1, 3, 8, 8))
    qmodel = prepare(model, found, resolve_layer_plan(found, QuantConfig(bits, act_bits, input_bits=8)), "logits")
    images = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    calibrate(qmodel, images, CalibrationConfig(bias_images=bias_images))
    return qmodel, model, images


def mean_error(qmodel: QuantizedModel, float_model: nn.Module, images: Tensor) -> Tensor:
    with torch.no_grad():
        return (qmodel(images) - float_model(images)).mean(dim=0)


def test_correction_removes_each_layers_mean_output_error():
    qmodel, model, images = quantized(3, 0)
    assert all(not layer.bias_shift.any() for layer in qmodel.layers)  # zero shifts without correction
    before = mean_error(qmodel, model, images).abs().max().item()
    correct_biases(qmodel, images)
    depthwise = qmodel.quant_layer("depthwise")
    assert depthwise.bias_shift.shape == (8,) and depthwise.bias_shift.abs().max() > 1e-3
    # the depthwise conv, given the inputs the quantized model gives it, now errs by 0 on average
    seen = {}
    hook = qmodel.model.depthwise.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        qmodel(images)
        hook.remove()
        x = seen["x"]
        quantized_out = nn.functional.conv2d(depthwise.input_quant(x), depthwise.weight_quant(model.depthwise.weight),
                                             depthwise.quantized_bias(depthwise.bias_shift), padding=1, groups=8)
        float_out = model.depthwise(x)
    # up to the rounding of the int32 bias: half a step of input step x weight step
    half_step = depthwise.bias_scale(depthwise.bias_shift) / 2
    assert ((quantized_out - float_out).mean(dim=(0, 2, 3)).abs() <= half_step + 1e-6).all()
    # the logits' mean error against the float model shrinks (what is left comes from earlier
    # layers' errors through the float weights: each layer is corrected against itself)
    after = mean_error(qmodel, model, images).abs().max().item()
    assert after < before / 3


def test_calibration_corrects_on_a_seeded_subset_and_the_fold_keeps_the_correction():
    qmodel, _, images = quantized(3, 16)
    again, _, _ = quantized(3, 16)
    for layer, other in zip(qmodel.layers, again.layers):
        assert torch.equal(layer.bias_shift, other.bias_shift)
    deployed = fold_batch_norms(qmodel)
    stem = deployed.quant_layer("stem")  # the BatchNorm and the correction folded into one bias
    assert stem.deployed_bias is not None and stem.bias_shift is None
    depthwise = deployed.quant_layer("depthwise")  # no bias of its own, nor a BatchNorm: the shift is its bias
    assert depthwise.deployed_bias is None
    assert torch.equal(depthwise.bias_shift, qmodel.quant_layer("depthwise").bias_shift)
    assert deployed.state_dict().keys() == fold_batch_norms(quantized(3, 0)[0]).state_dict().keys()
    uncorrected = fold_batch_norms(quantized(3, 0)[0])
    with torch.no_grad():
        expected = qmodel(images)
        # equal but for activations on a rounding boundary (folding rescales the steps), far
        # closer than the same model deployed without the correction
        assert (deployed(images) - expected).abs().mean().item() < 5e-4
        assert (uncorrected(images) - expected).abs().mean().item() > 2e-3


def test_correction_needs_the_model_before_folding():
    qmodel, _, images = quantized(4, 0)
    with pytest.raises(ValueError, match="before folding"):
        correct_biases(fold_batch_norms(qmodel), images)


def test_rounding_shifts_remove_the_mean_error_of_one_layers_weight_rounding():
    """Each quantizer's shift, measured in one float forward, is minus the mean over images and
    positions of conv(float input, rounded - float weight): with it, the layer alone at that
    rounding errs by 0 on average."""
    from fddaq.quant.bias import rounding_shifts
    from fddaq.quant.modules import WeightQuantizer

    qmodel, model, images = quantized(8, 0, act_bits=2)  # coarse inputs: the shifts must see float ones
    weight = model.depthwise.weight
    kept = {layer.name: (layer.weight_quant, layer.bias_shift.clone()) for layer in qmodel.layers}
    quantizers = []
    for bits in (2, 3):
        quant = WeightQuantizer(bits, 8, 0, affine=False)
        quant.set_mse(weight)
        quantizers.append(quant)
    shifts = rounding_shifts(qmodel, {"depthwise": quantizers}, images, batch_size=24)  # batches of 24, 24, 16
    assert set(shifts) == {"depthwise"} and len(shifts["depthwise"]) == 2
    seen = {}
    hook = model.depthwise.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model(images)
        hook.remove()
        for quant, shift in zip(quantizers, shifts["depthwise"]):
            rounded = nn.functional.conv2d(seen["x"], quant(weight), shift, padding=1, groups=8)
            error = (rounded - model.depthwise(seen["x"])).mean(dim=(0, 2, 3))
            assert shift.abs().max() > 1e-3 and error.abs().max() < 1e-5
    assert qmodel.tap is None
    for layer in qmodel.layers:  # the model is left as it was
        assert layer.weight_quant is kept[layer.name][0] and torch.equal(layer.bias_shift, kept[layer.name][1])
