import math

import pytest
import torch

from fddaq.config import QuantConfig
from fddaq.quant.capture import capture
from fddaq.sensitivity import sensitivity


def test_the_quantizer_that_breaks_the_model_ranks_first(tiny_model):
    found = capture(tiny_model, torch.zeros(2, 1, 16, 16))
    images = torch.randn(32, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    synthetic = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    quant = QuantConfig(8, 8, layers=("conv2=2/8",), activations="inputs")
    result = sensitivity(tiny_model, found, found.outputs[0].name, quant, images, synthetic)
    top = result.quantizers[0]
    assert (top.layer, top.role, top.bits) == ("conv2", "weight", 2)
    assert len(result.quantizers) == 8  # weight and input of each of the 4 layers
    kls = [q.divergence.kl for q in result.quantizers]
    assert kls == sorted(kls, reverse=True) and all(kl >= -1e-6 for kl in kls)
    inputs = {q.layer: q.bits for q in result.quantizers if q.role == "input"}
    assert inputs == {"conv1": 8, "conv2": 8, "short": 8, "fc": 8}
    assert set(result.splits) == {"W8A8"}  # every split is the plan itself: the override keeps conv2 at 2 bits
    assert result.splits["W8A8"].kl > 0
    assert top.divergence.kl_synthetic is not None and 0 <= top.divergence.agreement <= 100
    assert math.isfinite(result.to_json()["quantizers"][0]["divergence"]["kl"]) and result.synthetic_images == 8


def test_one_quantizer_alone_changes_less_than_all_of_them(tiny_model):
    found = capture(tiny_model, torch.zeros(2, 1, 16, 16))
    images = torch.randn(32, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    result = sensitivity(tiny_model, found, found.outputs[0].name, QuantConfig(3, 3), images)
    assert set(result.splits) == {"W3A8", "W8A3", "W3A3"}
    assert max(q.divergence.kl for q in result.quantizers) < result.splits["W3A3"].kl
    assert result.quantizers[0].divergence.kl_synthetic is None


def test_with_every_tensor_quantized_each_quantizer_is_measured_once(tiny_model):
    """A layer that reads a quantized tensor as it is has no input quantizer of its own: the
    tensor's quantizer is measured once, as an output."""
    found = capture(tiny_model, torch.zeros(2, 1, 16, 16))
    images = torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    result = sensitivity(tiny_model, found, found.outputs[0].name, QuantConfig(8, 8, activations="all"), images)
    inputs = {q.layer for q in result.quantizers if q.role == "input"}
    outputs = {q.layer for q in result.quantizers if q.role == "output"}
    assert inputs == {layer.name for layer in found.layers} - set(found.tied)
    assert outputs == {site.name for site in found.sites} and found.tied



def test_divergence_is_the_kl_and_top1_agreement_of_the_outputs():
    """On fixed logits (the inputs themselves): KL(teacher || model) in nats per image and the
    share of images whose top-1 class is the teacher's, on the images and the synthetic ones."""
    import torch.nn.functional as F
    from torch import nn

    from fddaq.sensitivity import Measure

    class Shift(nn.Module):  # logits: the input plus `shift` on the second class
        def __init__(self, shift: float) -> None:
            super().__init__()
            self.shift = nn.Parameter(torch.tensor([0.0, shift]))

        def forward(self, x):
            return x + self.shift

    images = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 3.0], [4.0, 1.0]])
    measure = Measure(Shift(0.0), images, images[:1])
    same = measure(Shift(0.0))
    assert (same.kl, same.agreement, same.kl_synthetic, same.agreement_synthetic) == (0.0, 100.0, 0.0, 100.0)
    shifted = measure(Shift(2.5))  # the first image's top class moves to the second; the others keep theirs
    expected = F.kl_div(F.log_softmax(images + torch.tensor([0.0, 2.5]), 1), F.log_softmax(images, 1),
                        reduction="batchmean", log_target=True).item()
    assert shifted.agreement == 75.0 and shifted.kl == pytest.approx(expected) and shifted.kl > 0
    assert shifted.agreement_synthetic == 0.0
    assert Measure(Shift(0.0), images, None)(Shift(2.5)).kl_synthetic is None
