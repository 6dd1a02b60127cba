"""Train FDDA's generator against the float model, then draw labelled synthetic images."""

from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import Callable

import torch
from torch import Tensor, nn

from ..config import SynthConfig
from ..device import fast_float, model_device, place
from ..distributed import current, data_parallel
from ..errors import ConfigError
from ..events import EventHandler, emit
from ..stats import ClassStatistics, record_bn_inputs
from .generator import Generator
from .objective import Objective, SynthResult


def train_generator(
    teacher: nn.Module,
    layers: list[tuple[str, nn.BatchNorm2d]],
    statistics: ClassStatistics,
    image_shape: tuple[int, int, int],
    config: SynthConfig = SynthConfig(),
    on_event: EventHandler | None = None,
    on_checkpoint: Callable[[dict], None] | None = None,
    resume: dict | None = None,
) -> SynthResult:
    """Train a conditional generator whose images match the teacher's BN running statistics
    (all layers) and, batch by batch for one class at a time, that class's real BNS center in
    the deep layers (C-BNS) and the center plus noise (D-BNS): `objective.Objective`. Under
    torchrun each rank draws its own share of every batch (see `distributed`); rank 0 alone
    hands `on_checkpoint` a resumable state every `config.checkpoint_every` steps, and `resume`
    (one process) continues from one to the same generator as an uninterrupted run."""
    objective = Objective(teacher, layers, statistics, config)
    ranks = current()
    if resume is not None and ranks.world > 1:
        raise ConfigError("resuming is for one process: a state holds one rank's random draws")
    if not ranks.is_main:
        on_checkpoint = None
    batch_size = ranks.share(config.batch_size, "synthesis batch_size")
    torch.manual_seed(config.seed)
    rng = torch.Generator().manual_seed(config.seed + ranks.rank)
    channels, size, _ = image_shape
    num_classes = statistics.num_classes
    device = model_device(teacher)
    generator = place(Generator(num_classes, channels, size, config.latent_dim, config.width), device).train()
    optimizer = torch.optim.Adam(generator.parameters(), lr=config.lr, betas=(0.5, 0.999))
    milestones = [int(config.steps * f) for f in config.lr_milestones]
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    first = 1
    if resume is not None:
        first = resume["step"] + 1
        generator.load_state_dict(resume["generator"])
        optimizer.load_state_dict(resume["optimizer"])
        schedule.load_state_dict(resume["schedule"])
        rng.set_state(resume["rng"])
        objective.restore(resume)
    trainer = data_parallel(generator, ranks)

    def state(step: int) -> dict:
        return copy.deepcopy({"step": step, "generator": generator.state_dict(), "optimizer": optimizer.state_dict(),
                              "schedule": schedule.state_dict(), "rng": rng.get_state(), **objective.snapshot()})

    def teacher_logits(labels: Tensor) -> Tensor:
        z = torch.randn(len(labels), config.latent_dim, generator=rng).to(device)
        with fast_float(device):
            return teacher(trainer(z, labels)).float()

    emit(on_event, "synthesize", first - 1, config.steps)
    with objective.frozen_teacher(), record_bn_inputs(layers, per_image=False) as stats:
        for step in range(first, config.steps + 1):
            candidates = objective.candidates(step)
            two_passes = len(candidates) > 0
            labels = torch.randint(num_classes, (batch_size,), generator=rng).to(device)
            stats.clear()
            # DDP syncs gradients once per backward: only the last pass before it prepares that
            with trainer.no_sync() if two_passes and trainer is not generator else nullcontext():
                parts = objective.mixed(stats, teacher_logits(labels), labels)
            if two_passes:
                label = candidates[torch.randint(len(candidates), (1,), generator=rng)].item()
                single = torch.full((batch_size,), label, dtype=torch.long, device=device)
                stats.clear()
                parts |= objective.single(step, label, stats, teacher_logits(single), single, rng)
            objective.minimise(parts, optimizer)
            schedule.step()
            if on_checkpoint is not None and objective.checkpoint_due(step):
                on_checkpoint(state(step))
            objective.progress(step, on_event)
    return objective.result(generator)


@torch.no_grad()
def generate(
    generator: Generator,
    num: int,
    seed: int = 0,
    classes: Tensor | None = None,
    batch_size: int = 64,
    on_event: EventHandler | None = None,
) -> tuple[Tensor, Tensor]:
    """`num` images with labels spread evenly over `classes` (default: all), shuffled, drawn
    in batches from the generator in train mode (its last BatchNorm standardises per batch)."""
    rng = torch.Generator().manual_seed(seed)
    classes = torch.arange(generator.num_classes) if classes is None else classes
    labels = classes[torch.arange(num) % len(classes)][torch.randperm(num, generator=rng)]
    generator.train()
    images = []
    emit(on_event, "generate", 0, num)
    device = model_device(generator)
    for start in range(0, num, batch_size):
        batch = labels[start : start + batch_size].to(device)
        with fast_float(device):
            images.append(generator.sample(batch, rng).float().cpu())
        emit(on_event, "generate", min(num, start + batch_size), num)
    return torch.cat(images), labels
