"""How good synthetic images are, measured in the float model's deep BatchNorm statistics.

- separation: is an image's deep-layer BNS nearer its own class center than any other
  class's? (FDDA's inter-class separation; real held-out images give the reference rate)
- diversity: the spread of deep-layer BNS within a class (a generator that collapses to one
  mode per class has near-zero spread even when the float model classifies it perfectly).

Statistics are standardised per dimension with the real calibration images' spread, so every
channel of every deep layer weighs the same; that spread is floored at a tenth of its median,
because a dimension that hardly varies over the real images (a channel a ReLU6 keeps at zero)
would otherwise dominate every distance (EfficientNet-Lite0: views of one image measured 24x
the spread of two different real photos, from such channels alone)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from ..evaluate import top1
from ..stats import ClassStatistics, image_statistics


def deep_features(means: list[Tensor], variances: list[Tensor], start: int) -> Tensor:
    """Per image, the concatenated means and variances of BN layers `start` onwards: (N, D)."""
    return torch.cat([torch.cat([m, v], 1) for m, v in zip(means[start:], variances[start:])], 1)


def feature_scale(real: Tensor, floor: float = 0.1) -> tuple[Tensor, Tensor] | None:
    """The real features' mean and spread per dimension, the spread at least `floor` x its median
    over dimensions; None with fewer than two real images (no spread to measure in)."""
    if len(real) < 2:
        return None
    unit = real.std(0)
    return real.mean(0), unit.clamp(min=max(floor * unit.median().item(), 1e-6))


@dataclass(frozen=True)
class SetQuality:
    images: int
    float_top1: float  # the float model's accuracy on the images' own labels
    separation: float | None  # percent of images nearest their own class center (None: no class has one)
    diversity: float | None  # mean over classes of the RMS standardised distance to the class mean
    # (None: no class has two images, or fewer than two real images give no scale)

    def to_json(self) -> dict:
        return asdict(self)

    def row(self) -> str:
        """'top-1% / separation% / diversity' for tables ('-' where not measured)."""
        separation = "-" if self.separation is None else f"{self.separation:.1f}%"
        diversity = "-" if self.diversity is None else f"{self.diversity:.3f}"
        return f"{self.float_top1:.1f}% / {separation} / {diversity}"


class QualityProbe:
    """Measures image sets against the real calibration images' class centers (none for
    data-free synthesis without images: then only the float model's top-1 is measured)."""

    def __init__(self, model: nn.Module, layers: list[tuple[str, nn.BatchNorm2d]], reference: ClassStatistics, start: int):
        self.model, self.layers, self.start = model, layers, start
        real = deep_features(reference.means, reference.variances, start)
        self.scale = feature_scale(real)
        mean_c, var_c, self.has_center = reference.centers(exclude_misclassified=False)
        self.centers = self.standardised(deep_features(mean_c, var_c, start))

    def standardised(self, features: Tensor) -> Tensor:
        return features if self.scale is None else (features - self.scale[0]) / self.scale[1]

    def measure(self, images: Tensor, labels: Tensor) -> SetQuality:
        means, variances, logits = image_statistics(self.model, self.layers, images)
        features = self.standardised(deep_features(means, variances, self.start))
        centred = self.has_center[labels]
        separation = None
        if centred.any():
            distances = torch.cdist(features[centred], self.centers)
            distances[:, ~self.has_center] = float("inf")
            separation = 100.0 * (distances.argmin(1) == labels[centred]).float().mean().item()
        spreads = []
        for k in labels.unique():
            members = features[labels == k]
            if len(members) > 1:
                spreads.append((members - members.mean(0)).pow(2).sum(1).mean().div(members.shape[1]).sqrt())
        diversity = torch.stack(spreads).mean().item() if spreads and self.scale is not None else None
        return SetQuality(len(labels), top1(logits, labels), separation, diversity)
