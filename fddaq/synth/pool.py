"""FDDA's losses on a pool of images optimised directly, without a generator.

Each class with real calibration images gets `num_images / classes` pool images, started from
augmented views of its own images (`finetune.augment`: a shift and a mirror) plus a little
Gaussian noise. Classes without one (data-free, or the classes a few images do not cover)
start from noise, when they are drawn at all (`classes`). Every step takes, as FDDA's generator
training does, a batch of random pool images for the cross-entropy and the global BNS loss,
and a single-class batch for the cross-entropy and the class's C-BNS and D-BNS losses in the
deep layers; Adam moves the pixels. A step costs two teacher forward and backward passes and
nothing else, at any resolution (the generator dominated at 224 px)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import SynthConfig
from ..device import model_device
from ..events import EventHandler, emit
from ..finetune import augment
from ..stats import ClassStatistics, record_bn_inputs
from .objective import Objective, SynthResult


def initial_pool(real: Tensor, labels: Tensor, classes: Tensor, num: int, noise: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """`num` images spread evenly over `classes` (shuffled), each an augmented view of a real
    image of its class (in turn) plus `noise` x N(0, 1), or N(0, 1) for a class without one."""
    pool_labels = classes[torch.arange(num) % len(classes)][torch.randperm(num, generator=generator)]
    images = torch.randn((num, *real.shape[1:]), generator=generator)
    for k in classes.tolist():
        slots = (pool_labels == k).nonzero().flatten()
        own = real[labels == k]
        if len(own) and len(slots):
            views = augment(own[torch.arange(len(slots)) % len(own)], generator)
            images[slots] = views + noise * images[slots]
    return images, pool_labels


def optimize_pool(
    teacher: nn.Module,
    layers: list[tuple[str, nn.BatchNorm2d]],
    statistics: ClassStatistics,
    real: Tensor,
    labels: Tensor,
    config: SynthConfig,
    on_event: EventHandler | None = None,
) -> tuple[Tensor, Tensor, SynthResult]:
    """Optimise `config.num_images` pool images for `config.steps` steps with FDDA's losses
    (`objective.Objective`); (images, labels, result) on the CPU. The pool covers the classes
    that have a real image (all classes when none has)."""
    objective = Objective(teacher, layers, statistics, config)
    rng = torch.Generator().manual_seed(config.seed)
    covered = labels.unique() if len(labels) else torch.arange(statistics.num_classes)
    images, pool_labels = initial_pool(real.cpu(), labels.cpu(), covered, config.num_images, config.pool_noise, rng)
    device = model_device(teacher)
    pool = images.to(device).requires_grad_(True)
    pool_labels = pool_labels.to(device)
    optimizer = torch.optim.Adam([pool], lr=config.pool_lr)
    batch = min(config.batch_size, config.num_images)
    emit(on_event, "synthesize", 0, config.steps)
    with objective.frozen_teacher(), record_bn_inputs(layers, per_image=False) as stats:
        for step in range(1, config.steps + 1):
            chosen = torch.randint(len(pool), (batch,), generator=rng).to(device)
            stats.clear()
            parts = objective.mixed(stats, teacher(pool[chosen]).float(), pool_labels[chosen])
            candidates = objective.candidates(step).to(device)
            candidates = candidates[torch.isin(candidates, pool_labels)]
            if len(candidates):
                label = candidates[torch.randint(len(candidates), (1,), generator=rng).item()].item()
                members = (pool_labels == label).nonzero().flatten()
                chosen = members[torch.randint(len(members), (batch,), generator=rng).to(device)]
                stats.clear()
                parts |= objective.single(step, label, stats, teacher(pool[chosen]).float(), pool_labels[chosen], rng)
            objective.minimise(parts, optimizer, step, on_event)
    return pool.detach().cpu(), pool_labels.cpu(), objective.result(None)
