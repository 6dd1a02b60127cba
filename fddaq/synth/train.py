"""Train FDDA's generator against the float model, then draw labelled synthetic images."""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from ..checkpoint import loop_state, resume_loop
from ..config import SynthConfig
from ..device import fast_float, model_device, place
from ..distributed import Ranks, data_parallel
from ..errors import ConfigError
from ..events import EventHandler, emit
from ..stats import ClassStatistics, record_bn_inputs
from .generator import Generator
from .objective import Objective, SynthResult
from .pool import RowAdam


class _Both:
    """One optimizer step for the generator's weights and the learned latents drawn."""

    def __init__(self, weights: torch.optim.Optimizer, latents: RowAdam) -> None:
        self.weights, self.latents = weights, latents

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.weights.zero_grad(set_to_none)
        self.latents.zero_grad(set_to_none)

    def step(self) -> None:
        self.weights.step()
        self.latents.step()


def train_generator(
    teacher: nn.Module,
    layers: list[tuple[str, nn.BatchNorm2d]],
    statistics: ClassStatistics,
    image_shape: tuple[int, int, int],
    config: SynthConfig = SynthConfig(),
    on_event: EventHandler | None = None,
    on_checkpoint: Callable[[dict], None] | None = None,
    resume: dict | None = None,
    bounds: tuple[Tensor, Tensor] | None = None,
    ranks: Ranks = Ranks(),
) -> SynthResult:
    """Train a conditional generator whose images match the teacher's BN running statistics
    (all layers) and, batch by batch for one class at a time, that class's real BNS center in
    the deep layers (C-BNS) and the center plus noise (D-BNS): `objective.Objective`. With
    several `ranks` (a torchrun job) each draws its own share of every batch (see `distributed`); rank 0 alone
    hands `on_checkpoint` a resumable state every `config.checkpoint_every` steps, and `resume`
    (one process) continues from one to the same generator as an uninterrupted run. `bounds`:
    the model's input range (`Preprocess.input_range`), which `config.generator_output`
    "range" maps the generator's output into. With `config.latents` "learned" the result
    holds the `num_images` latents and labels that `generate` draws from."""
    objective = Objective(teacher, layers, statistics, config)
    if resume is not None and ranks.world > 1:
        raise ConfigError("resuming is for one process: a state holds one rank's random draws")
    learned = config.latents == "learned"
    if learned and ranks.world > 1:
        raise ConfigError("learned latents are for one process: each rank would move its own copy")
    if config.generator_output == "range" and bounds is None:
        raise ConfigError("generator_output 'range' needs the model's input range (bounds)")
    if not ranks.is_main:
        on_checkpoint = None
    batch_size = ranks.share(config.batch_size, "synthesis batch_size")
    rng = torch.Generator().manual_seed(config.seed + ranks.rank)
    channels, size, _ = image_shape
    num_classes = statistics.num_classes
    device = model_device(teacher)
    with torch.random.fork_rng(devices=[]):  # a seeded initialisation; the caller's random state is left as it was
        torch.manual_seed(config.seed)
        generator = Generator(num_classes, channels, size, config.latent_dim, config.width,
                              bounds if config.generator_output == "range" else None, config.label_embedding)
    generator = place(generator, device).train()
    optimizer = torch.optim.Adam(generator.parameters(), lr=config.lr, betas=(0.5, 0.999))
    milestones = [int(config.steps * f) for f in config.lr_milestones]
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    latents = latent_labels = held = None
    if learned:  # Genie-like: one latent per final image, spread evenly over the classes
        latent_labels = (torch.arange(config.num_images) % num_classes)[torch.randperm(config.num_images, generator=rng)]
        latents = RowAdam(torch.randn(config.num_images, config.latent_dim, generator=rng).to(device), config.pool_lr)
        held = latent_labels.unique()  # the classes that hold a latent (on the CPU, as the candidates)
        latent_labels = latent_labels.to(device)
    first = 1
    if resume is not None:
        first = resume_loop(resume, rng, generator=generator, optimizer=optimizer, schedule=schedule)
        objective.restore(resume)
        if learned:
            latents.pool.copy_(resume["latents"])
            latents.load_state_dict(resume["latent_optimizer"])
    trainer = data_parallel(generator, ranks)

    def state(step: int) -> dict:
        extra = {"latents": latents.pool, "latent_optimizer": latents.state_dict()} if learned else {}
        return {**loop_state(step, rng, generator=generator, optimizer=optimizer, schedule=schedule),
                **copy.deepcopy({**objective.snapshot(), **extra})}

    def batch(label: int | None) -> tuple[Tensor, Tensor]:
        """A batch's labels and rows of the learned latents (None: fresh latents)."""
        if not learned:
            labels = torch.randint(num_classes, (batch_size,), generator=rng) if label is None else \
                torch.full((batch_size,), label, dtype=torch.long)
            return labels.to(device), None
        members = torch.arange(len(latent_labels), device=device) if label is None else \
            (latent_labels == label).nonzero().flatten()
        rows = members[torch.randint(len(members), (batch_size,), generator=rng).to(device)]
        return latent_labels[rows], rows

    def pick(candidates: Tensor) -> int:
        """The class of a step's single-class pass."""
        return candidates[torch.randint(len(candidates), (1,), generator=rng)].item()

    def teacher_logits(labels: Tensor, z: Tensor | None) -> Tensor:
        if z is None:
            z = torch.randn(len(labels), config.latent_dim, generator=rng).to(device)
        with fast_float(device):
            return teacher(trainer(z, labels)).float()

    emit(on_event, "synthesize", first - 1, config.steps)
    with objective.frozen_teacher(), record_bn_inputs(layers, per_image=False) as stats:
        for step in range(first, config.steps + 1):
            candidates = objective.candidates(step)
            if learned:  # classes that hold a latent
                candidates = candidates[torch.isin(candidates, held)]
            two_passes = len(candidates) > 0
            labels, rows = batch(None)
            label, single, z, z_single = None, None, None, None
            if learned:  # one leaf for the latents of both passes (drawn first: a latent may be in both)
                label = pick(candidates) if two_passes else None
                single, single_rows = batch(label) if two_passes else (None, rows[:0])
                drawn, where = torch.unique(torch.cat([rows, single_rows]), return_inverse=True)
                leaf = latents.draw(drawn)
                z, z_single = leaf[where[:batch_size]], leaf[where[batch_size:]]
            stats.clear()
            # DDP syncs gradients once per backward: only the last pass before it prepares that
            with trainer.no_sync() if two_passes and trainer is not generator else nullcontext():
                parts = objective.mixed(stats, teacher_logits(labels, z), labels)
            if two_passes:
                if label is None:  # fresh latents: the class is drawn after the mixed pass, as always
                    label = pick(candidates)
                    single = batch(label)[0]
                stats.clear()
                parts |= objective.single(step, label, stats, teacher_logits(single, z_single), single, rng)
            objective.minimise(parts, _Both(optimizer, latents) if learned else optimizer)
            schedule.step()
            if on_checkpoint is not None and objective.checkpoint_due(step):
                on_checkpoint(state(step))
            objective.progress(step, on_event)
    return objective.result(generator, (latents.pool.cpu(), latent_labels.cpu()) if learned else None)


@torch.no_grad()
def generate(
    generator: Generator,
    num: int,
    seed: int = 0,
    classes: Tensor | None = None,
    batch_size: int = 64,
    on_event: EventHandler | None = None,
    latents: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """`num` images with labels spread evenly over `classes` (default: all), shuffled, drawn
    in batches from the generator in train mode (its last BatchNorm, if any, standardises per
    batch); or, given learned `latents` and their labels, the first `num` of their images."""
    rng = torch.Generator().manual_seed(seed)
    if latents is None:
        classes = torch.arange(generator.num_classes) if classes is None else classes
        labels = classes[torch.arange(num) % len(classes)][torch.randperm(num, generator=rng)]
    else:
        latents, labels = latents[0][:num], latents[1][:num]
    generator.train()
    images = []
    emit(on_event, "generate", 0, num)
    device = model_device(generator)
    for start in range(0, len(labels), batch_size):
        batch = labels[start : start + batch_size].to(device)
        with fast_float(device):
            image = generator.sample(batch, rng) if latents is None else generator(latents[start : start + batch_size].to(device), batch)
            images.append(image.float().cpu())
        emit(on_event, "generate", min(len(labels), start + batch_size), len(labels))
    return torch.cat(images), labels
