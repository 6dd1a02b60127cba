"""Where a model breaks at low bits: the output divergence from float when a single quantizer
is at its planned bits and every other value stays float (ZeroQ's sensitivity), for each
layer's weights and each layer's quantized input; then the whole model with only the weights
at their bits (activations at 8) and with only the activations at their bits (weights at 8).

The divergence is the KL divergence of the quantized model's class distribution from the
float model's, averaged over images (over positions too for a dense output), measured on the
calibration images and, when given, on synthetic images. Quantizers are calibrated as
`quantize` calibrates them (MSE ranges on the calibration images), without bias correction
(which corrects for every quantizer at once): what rounding itself costs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import CalibrationConfig, QuantConfig
from .device import model_device
from .events import EventHandler, emit
from .quant.calibrate import calibrate
from .quant.capture import Capture
from .quant.modules import ActivationQuantizer, QuantizedModel, QuantLayer, Selected
from .quant.plan import resolve_layer_plan
from .quant.prepare import prepare

ROLES = {"w": "weight", "x": "input", "y": "output"}
BATCH = 64


@dataclass(frozen=True)
class Divergence:
    """KL divergence from float (nats per image) and top-1 agreement with float (percent) on
    the calibration images, and on synthetic images when there were some."""

    kl: float
    agreement: float
    kl_synthetic: float | None = None
    agreement_synthetic: float | None = None


@dataclass(frozen=True)
class QuantizerSensitivity:
    layer: str  # a layer, or for role "output" a site (`quant.sites`)
    role: str  # "weight", "input" or "output"
    bits: int
    divergence: Divergence


@dataclass(frozen=True)
class Sensitivity:
    quant: QuantConfig
    images: int
    synthetic_images: int
    quantizers: tuple[QuantizerSensitivity, ...]  # most sensitive first
    splits: dict[str, Divergence]  # "W4A8", "W8A4", "W4A4" (the plan's bits in place of 4)

    def to_json(self) -> dict:
        return {
            "quant": asdict(self.quant), "images": self.images, "synthetic_images": self.synthetic_images,
            "quantizers": [asdict(q) for q in self.quantizers],
            "splits": {name: asdict(d) for name, d in self.splits.items()},
        }


def _per_position(logits: Tensor) -> Tensor:
    """[N, classes] or [N, classes, *positions] as rows of class logits."""
    return logits if logits.dim() <= 2 else logits.movedim(1, -1).reshape(-1, logits.shape[1])


@torch.no_grad()
def _outputs(model: nn.Module, images: Tensor) -> Tensor:
    """The model's outputs on `images` (on the model's device), on the CPU."""
    device = model_device(model)
    return torch.cat([_per_position(model(images[i : i + BATCH].to(device)).float().cpu())
                      for i in range(0, len(images), BATCH)])


def _compare(reference: Tensor, logits: Tensor) -> tuple[float, float]:
    kl = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(reference, 1), reduction="batchmean", log_target=True)
    return kl.item(), 100.0 * (logits.argmax(1) == reference.argmax(1)).float().mean().item()


class Measure:
    """The divergence from the float `teacher` of a model's outputs on `images` and, when
    given, `synthetic` (see `Divergence`)."""

    def __init__(self, teacher: nn.Module, images: Tensor, synthetic: Tensor | None) -> None:
        self.sets = [images] + ([] if synthetic is None or not len(synthetic) else [synthetic])
        self.references = [_outputs(teacher, x) for x in self.sets]

    def __call__(self, model: nn.Module) -> Divergence:
        found = [_compare(ref, _outputs(model, x)) for ref, x in zip(self.references, self.sets)]
        return Divergence(*found[0], *(found[1] if len(found) > 1 else (None, None)))


def calibrated(model: nn.Module, capture: Capture, quant: QuantConfig, output: str, images: Tensor,
               calibration: CalibrationConfig) -> QuantizedModel:
    """`model` prepared under `quant` and calibrated on `images`."""
    student = prepare(model, capture, resolve_layer_plan(capture, quant), output)
    calibrate(student, images, calibration)
    return student


def sensitivity(
    model: nn.Module,
    capture: Capture,
    output: str,
    quant: QuantConfig,
    images: Tensor,
    synthetic: Tensor | None = None,
    calibration: CalibrationConfig = CalibrationConfig(),
    on_event: EventHandler | None = None,
) -> Sensitivity:
    """The sensitivity of `model` (float, returning `output` among its outputs) to each
    quantizer of the plan `quant` gives, on `images` (calibration) and `synthetic`."""
    measure = Measure(Selected(model, output), images, synthetic)
    calibration = replace(calibration, bias_images=0)
    student = calibrated(model, capture, quant, output, images, calibration)
    jobs = [*((layer, "w") for layer in student.layers),
            *((layer, "x") for layer in student.layers if not layer.tied and layer.input_quant.enabled),
            *((site, "y") for site in student.sites)]
    total = len(jobs) + 3
    emit(on_event, "sensitivity", 0, total)
    found = []
    for index, (owner, role) in enumerate(jobs, 1):
        student.tap = only(owner, role)
        try:
            divergence = measure(student)
        finally:
            student.tap = None
        bits = owner.weight_quant.bits if role == "w" else owner.input_quant.bits if role == "x" else owner.bits
        found.append(QuantizerSensitivity(owner.name, ROLES[role], bits, divergence))
        emit(on_event, "sensitivity", index, total, kl=divergence.kl)
    splits = {}
    settings = [(quant.weight_bits, 8), (8, quant.act_bits), (quant.weight_bits, quant.act_bits)]
    for index, (weight_bits, act_bits) in enumerate(settings, len(jobs) + 1):
        # overrides, first/last bits and the quantized tensors kept (not `auto`'s choice per activation width)
        setting = replace(quant, weight_bits=weight_bits, act_bits=act_bits,
                          activations="all" if quant.all_tensors else "inputs")
        splits[f"W{weight_bits}A{act_bits}"] = measure(calibrated(model, capture, setting, output, images, calibration))
        emit(on_event, "sensitivity", index, total)
    ranked = tuple(sorted(found, key=lambda q: -q.divergence.kl))
    return Sensitivity(quant, len(images), 0 if synthetic is None else len(synthetic), ranked, splits)


def only(target: QuantLayer | ActivationQuantizer, role: str):
    """A tap that keeps one quantizer (`role` of `target`) and makes every other value float."""

    def tap(owner: QuantLayer | ActivationQuantizer, which: str, raw: Tensor, quantized: Tensor) -> Tensor:
        return quantized if owner is target and which == role else raw

    return tap
