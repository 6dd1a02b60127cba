"""FDDA's generator losses on plain tensors. BNS losses compare a batch's BatchNorm-input
mean and variance with a target per layer (mean-reduced MSE), averaged over layers. Given a
per-channel `scale` (a variance: `SynthConfig.bns_scale` "standardised"), each channel's mean
error is divided by its standard deviation and its variance error by its variance, so that a
layer or channel with large activations does not outweigh the others."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def bns_loss(mean: Tensor, var: Tensor, target_mean: Tensor, target_var: Tensor, scale: Tensor | None = None) -> Tensor:
    """MSE of the mean plus MSE of the variance for one layer; with `scale`, of the errors in
    units of each channel's spread (the scale is floored at a tenth of its median: a channel
    that never varies does not blow up)."""
    if scale is None:
        return F.mse_loss(mean, target_mean) + F.mse_loss(var, target_var)
    scale = torch.maximum(scale, 0.1 * scale.median() + 1e-12)  # on the tensor's device: no sync per layer
    return ((mean - target_mean) ** 2 / scale).mean() + ((var - target_var) / scale).square().mean()


def global_bns_loss(stats: list[tuple[Tensor, Tensor]], running: list[tuple[Tensor, Tensor]], standardised: bool = False) -> Tensor:
    """Batch statistics against every BN layer's running mean and variance (GDFQ/ZeroQ)."""
    return torch.stack([bns_loss(m, v, rm, rv, rv if standardised else None)
                        for (m, v), (rm, rv) in zip(stats, running, strict=True)]).mean()


def centralized_bns_loss(stats: list[tuple[Tensor, Tensor]], centers: list[tuple[Tensor, Tensor]], standardised: bool = False) -> Tensor:
    """BNS-centralized (C-BNS): a single-class batch's deep-layer statistics against its class
    center."""
    return torch.stack([bns_loss(m, v, cm, cv, cv if standardised else None)
                        for (m, v), (cm, cv) in zip(stats, centers, strict=True)]).mean()


def distorted_bns_loss(
    stats: list[tuple[Tensor, Tensor]],
    centers: list[tuple[Tensor, Tensor]],
    mean_std: float,
    var_std: float,
    generator: torch.Generator | None = None,
    standardised: bool = False,
) -> Tensor:
    """BNS-distorted (D-BNS): as C-BNS, against the center plus fresh Gaussian noise drawn per
    element (std `mean_std` on means, `var_std` on variances), imitating intra-class spread;
    `standardised` scales by the center's variance."""
    losses = []
    for (m, v), (cm, cv) in zip(stats, centers, strict=True):
        noise_m = torch.randn(cm.shape, generator=generator).to(cm.device) * mean_std  # drawn on the CPU: seeded alike on any device
        noise_v = torch.randn(cv.shape, generator=generator).to(cv.device) * var_std
        losses.append(bns_loss(m, v, cm + noise_m, cv + noise_v, cv if standardised else None))
    return torch.stack(losses).mean()


def class_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of the float model on generated images for their requested labels."""
    return F.cross_entropy(logits, labels)
