"""BatchNorm statistics (BNS): what the float model's BatchNorm layers see.

At the *input* of every BatchNorm2d (eval mode, execution order) we record the per-channel
spatial mean and biased variance, per image or per batch. Per-class centers of those
statistics on real calibration images are what FDDA's synthetic data is aligned to."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .device import batches, model_device
from .errors import ModelError


def batchnorm_layers(model: nn.Module, example: Tensor) -> list[tuple[str, nn.BatchNorm2d]]:
    """The model's BatchNorm2d layers in the order one forward pass calls them."""
    order: list[str] = []
    modules = {name: m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    handles = [
        m.register_forward_pre_hook(lambda m, args, name=name: order.append(name) if name not in order else None)
        for name, m in modules.items()
    ]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for handle in handles:
            handle.remove()
    if not order:
        raise ModelError("the model has no BatchNorm2d layer: FDDA synthesis aligns BatchNorm statistics and needs some; "
                         "quantize it on real images alone (`synthetic` 0, or `recipe` reconstruct or ptq)")
    return [(name, modules[name]) for name in order]


def deep_layer_start(num_layers: int) -> int:
    """FDDA's rule: the center losses use BN layers from int((N + 1) / 2) - 2 on (0-based),
    e.g. 8 of ResNet-18's 20 and 24 of MobileNetV2's 52."""
    return max(0, min(num_layers - 1, int((num_layers + 1) / 2) - 2))


@contextmanager
def record_bn_inputs(layers: list[tuple[str, nn.BatchNorm2d]], per_image: bool) -> Iterator[list[tuple[Tensor, Tensor]]]:
    """While active, each forward pass appends (mean, var) of every BN layer's input, in
    `layers` order, to the yielded list (cleared by the caller between passes).

    per_image: shapes (N, C), statistics over H, W; otherwise (C,), over N, H, W.
    Differentiable: gradients flow to whatever produced the input."""
    stats: list[tuple[Tensor, Tensor]] = []
    dims = (2, 3) if per_image else (0, 2, 3)

    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0].float()  # float32 statistics, also under autocast
        stats.append((x.mean(dims), x.var(dims, unbiased=False)))

    handles = [bn.register_forward_pre_hook(hook) for _, bn in layers]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def image_statistics(
    model: nn.Module, layers: list[tuple[str, nn.BatchNorm2d]], images: Tensor, batch_size: int = 64
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """Per-image BN-input statistics: a (N, C_l) mean and variance tensor per layer, and the
    model's logits (N, K); computed on the model's device, returned on the CPU."""
    model.eval()
    means: list[list[Tensor]] = [[] for _ in layers]
    variances: list[list[Tensor]] = [[] for _ in layers]
    logits = []
    with record_bn_inputs(layers, per_image=True) as stats:
        for batch in batches(images, batch_size, model_device(model)):
            stats.clear()
            logits.append(model(batch).float())
            for index, (mean, var) in enumerate(stats):
                means[index].append(mean)
                variances[index].append(var)
    return [torch.cat(m).cpu() for m in means], [torch.cat(v).cpu() for v in variances], torch.cat(logits).cpu()


@dataclass(frozen=True)
class ClassStatistics:
    """Per-image BNS of the real calibration images with their labels, and the per-class
    centers computed from them.

    `correct` marks images the float model classifies as their label. Centers use every
    image of a class (`centers(False)`) or only the correctly classified ones
    (`centers(True)`); a class without any (usable) image has no center."""

    means: list[Tensor]  # per layer (N, C_l)
    variances: list[Tensor]
    labels: Tensor  # (N,)
    correct: Tensor  # (N,) bool
    num_classes: int

    def centers(self, exclude_misclassified: bool) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """Per-layer (K, C_l) center means and variances, and a (K,) bool mask of the
        classes that have a center (rows of the others are zero)."""
        keep = self.correct if exclude_misclassified else torch.ones_like(self.correct)
        onehot = torch.zeros(len(self.labels), self.num_classes)
        onehot[keep, self.labels[keep]] = 1.0
        counts = onehot.sum(0)
        weights = onehot / counts.clamp(min=1)
        mean_centers = [weights.T @ m for m in self.means]
        var_centers = [weights.T @ v for v in self.variances]
        return mean_centers, var_centers, counts > 0

    @classmethod
    def without_images(cls, layers: list[tuple[str, nn.BatchNorm2d]], num_classes: int) -> ClassStatistics:
        """Statistics of no image: no class has a center (data-free synthesis)."""
        empty = [torch.zeros(0, bn.num_features) for _, bn in layers]
        nothing = torch.zeros(0, dtype=torch.long)
        return cls(empty, [e.clone() for e in empty], nothing, nothing.bool(), num_classes)

    @property
    def misclassified(self) -> int:
        return int((~self.correct).sum())


def class_statistics(
    model: nn.Module, layers: list[tuple[str, nn.BatchNorm2d]], images: Tensor, labels: Tensor, num_classes: int
) -> ClassStatistics:
    """BNS of labelled real images. Labels must lie in [0, num_classes)."""
    means, variances, logits = image_statistics(model, layers, images)
    return ClassStatistics(means, variances, labels, logits.argmax(1) == labels, num_classes)
