"""How good synthetic images are, measured in the float model's deep BatchNorm statistics.

- separation: is an image's deep-layer BNS nearer its own class center than any other
  class's? (FDDA's inter-class separation; real held-out images give the reference rate)
- diversity: the spread of deep-layer BNS within a class (a generator that collapses to one
  mode per class has near-zero spread even when the float model classifies it perfectly).

Statistics are standardised per dimension with the real calibration images' spread, so every
channel of every deep layer weighs the same."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from ..evaluate import top1
from ..stats import ClassStatistics, image_statistics


def deep_features(means: list[Tensor], variances: list[Tensor], start: int) -> Tensor:
    """Per image, the concatenated means and variances of BN layers `start` onwards: (N, D)."""
    return torch.cat([torch.cat([m, v], 1) for m, v in zip(means[start:], variances[start:])], 1)


@dataclass(frozen=True)
class SetQuality:
    images: int
    float_top1: float  # the float model's accuracy on the images' own labels
    separation: float  # percent of images nearest their own class center (classes with a center)
    diversity: float  # mean over classes of the RMS standardised distance to the class mean

    def to_json(self) -> dict:
        return asdict(self)


class QualityProbe:
    """Measures image sets against the real calibration images' class centers."""

    def __init__(self, model: nn.Module, layers: list[tuple[str, nn.BatchNorm2d]], reference: ClassStatistics, start: int):
        self.model, self.layers, self.start = model, layers, start
        real = deep_features(reference.means, reference.variances, start)
        self.offset = real.mean(0)
        self.unit = real.std(0).clamp(min=1e-6) if len(real) > 1 else torch.ones_like(self.offset)
        mean_c, var_c, self.has_center = reference.centers(exclude_misclassified=False)
        self.centers = (deep_features(mean_c, var_c, start) - self.offset) / self.unit

    def measure(self, images: Tensor, labels: Tensor) -> SetQuality:
        means, variances, logits = image_statistics(self.model, self.layers, images)
        features = (deep_features(means, variances, self.start) - self.offset) / self.unit
        centred = self.has_center[labels]
        distances = torch.cdist(features[centred], self.centers)
        distances[:, ~self.has_center] = float("inf")
        separation = 100.0 * (distances.argmin(1) == labels[centred]).float().mean().item() if centred.any() else float("nan")
        spreads = []
        for k in labels.unique():
            members = features[labels == k]
            if len(members) > 1:
                spreads.append((members - members.mean(0)).pow(2).sum(1).mean().div(members.shape[1]).sqrt())
        diversity = torch.stack(spreads).mean().item() if spreads else float("nan")
        return SetQuality(len(labels), top1(logits, labels), separation, diversity)
