"""FDDA's objective for one teacher and its calibration statistics: what the generator
(`synth.train`) and the image pool (`synth.pool`) both minimise, step by step.

A step has a pass on a batch of mixed classes (cross-entropy, global BNS against the running
statistics of every BN layer) and, while some class has a center, a pass on a batch of one
class (its cross-entropy, C-BNS and D-BNS in the deep layers), weighted by the config."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn

from ..config import SynthConfig
from ..device import model_device
from ..errors import ConfigError
from ..events import EventHandler, curve_end, emit
from ..stats import ClassStatistics, deep_layer_start
from .losses import centralized_bns_loss, class_loss, distorted_bns_loss, global_bns_loss


class Optimizer(Protocol):
    """What `Objective.minimise` steps: a torch optimizer, or the pool's `RowAdam`."""

    def zero_grad(self, set_to_none: bool = True) -> None: ...

    def step(self) -> None: ...


LOSS_NAMES = ("ce", "bns", "cbns", "dbns", "ce_single", "total")


@dataclass
class SynthResult:
    generator: nn.Module | None  # the trained generator; None for a pool
    deep_start: int
    num_bn_layers: int
    classes_with_center: int
    misclassified_excluded: int
    curves: dict[str, list[float]] = field(default_factory=dict)  # per loss, one value per step
    seconds: float = 0.0
    latents: tuple[Tensor, Tensor] | None = None  # the learned latents and their labels (`SynthConfig.latents`)

    def summary(self) -> dict:
        return {
            "deep_start": self.deep_start,
            "num_bn_layers": self.num_bn_layers,
            "classes_with_center": self.classes_with_center,
            "misclassified_excluded": self.misclassified_excluded,
            "seconds": self.seconds,
            "seconds_per_step": self.seconds / max(1, len(self.curves.get("total", []))),
            "final_losses": {k: curve_end(v) for k, v in self.curves.items() if v},
        }


class Objective:
    def __init__(self, teacher: nn.Module, layers: list[tuple[str, nn.BatchNorm2d]], statistics: ClassStatistics,
                 config: SynthConfig) -> None:
        self.deep = deep_layer_start(len(layers)) if config.deep_start is None else config.deep_start
        if self.deep >= len(layers):
            raise ConfigError(f"deep_start={self.deep} but the model has only {len(layers)} BatchNorm layers")
        device = model_device(teacher)
        self.teacher, self.layers, self.statistics, self.config = teacher, layers, statistics, config
        self.running = [(bn.running_mean, bn.running_var) for _, bn in layers]
        self.centers = {
            flag: ([m.to(device) for m in means], [v.to(device) for v in variances], has_center)
            for flag, (means, variances, has_center) in ((f, statistics.centers(f)) for f in (False, True))
        }
        self.standardised = config.bns_scale == "standardised"
        self.use_centers = config.cbns_weight > 0 or config.dbns_weight > 0 or config.ce_single_weight > 0
        self.warmup = int(config.center_warmup * config.steps)
        self.weights = {"ce": config.ce_weight, "bns": config.bns_weight, "cbns": config.cbns_weight,
                        "dbns": config.dbns_weight, "ce_single": config.ce_single_weight}
        self.curves: dict[str, list[float]] = {name: [] for name in LOSS_NAMES}
        self.start = time.perf_counter()

    def candidates(self, step: int) -> Tensor:
        """Classes whose center the single-class pass may use at `step` (1-based); empty when
        the center losses are off. Misclassified images leave the centers after the warmup."""
        has_center = self.centers[step > self.warmup][2]
        return has_center.nonzero().flatten() if self.use_centers else has_center.new_zeros(0, dtype=torch.long)

    def mixed(self, stats: list[tuple[Tensor, Tensor]], logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """The mixed-class pass: cross-entropy and global BNS."""
        return {"ce": class_loss(logits, labels), "bns": global_bns_loss(stats, self.running, self.standardised)}

    def single(self, step: int, label: int, stats: list[tuple[Tensor, Tensor]], logits: Tensor, labels: Tensor,
               rng: torch.Generator) -> dict[str, Tensor]:
        """The single-class pass for class `label`: C-BNS, D-BNS (deep layers) and cross-entropy."""
        mean_c, var_c, _ = self.centers[step > self.warmup]
        targets = [(m[label], v[label]) for m, v in zip(mean_c[self.deep:], var_c[self.deep:])]
        noise = (self.config.noise_mean_std, self.config.noise_var_std)
        return {"cbns": centralized_bns_loss(stats[self.deep:], targets, self.standardised),
                "dbns": distorted_bns_loss(stats[self.deep:], targets, *noise, rng, self.standardised),
                "ce_single": class_loss(logits, labels)}

    def minimise(self, parts: dict[str, Tensor], optimizer: Optimizer) -> None:
        """One optimizer step on the weighted sum of `parts`; the curves."""
        total = sum(self.weights[k] * v for k, v in parts.items())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        for name, value in parts.items():
            self.curves[name].append(value.item())
        self.curves["total"].append(total.item())

    def progress(self, step: int, on_event: EventHandler | None) -> None:
        """The progress event of a finished step (after its state was handed out: an
        interruption raised by the handler leaves that state behind)."""
        emit(on_event, "synthesize", step, self.config.steps, loss=self.curves["total"][-1])

    def checkpoint_due(self, step: int) -> bool:
        """Whether a resumable state is handed out after `step` (not after the last)."""
        return step < self.config.steps and step % self.config.checkpoint_every == 0

    def snapshot(self) -> dict:
        """The curves and the time spent so far, for a resumable state."""
        return {"curves": {k: torch.tensor(v, dtype=torch.float64) for k, v in self.curves.items()},
                "seconds": time.perf_counter() - self.start}

    def restore(self, state: dict) -> None:
        self.curves = {k: v.tolist() for k, v in state["curves"].items()}
        self.start = time.perf_counter() - state["seconds"]

    @contextmanager
    def frozen_teacher(self) -> Iterator[None]:
        """The teacher in eval mode without parameter gradients (restored afterwards)."""
        self.teacher.eval()
        frozen = [p for p in self.teacher.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def result(self, generator: nn.Module | None, latents: tuple[Tensor, Tensor] | None = None) -> SynthResult:
        return SynthResult(generator, self.deep, len(self.layers), int(self.centers[True][2].sum()),
                           self.statistics.misclassified, self.curves, time.perf_counter() - self.start, latents)
