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


class _Latents:
    """The generator's inputs and their labels, drawn with the run's generator `rng`: fresh noise
    for every pass, or (`config.latents` "learned", Genie-like) one learned latent per final
    image, spread evenly over the classes, drawn by rows and moved by their own optimizer."""

    def __init__(self, config: SynthConfig, num_classes: int, batch_size: int, rng: torch.Generator,
                 device: torch.device) -> None:
        self.config, self.num_classes, self.batch_size, self.rng, self.device = config, num_classes, batch_size, rng, device
        self.learned = config.latents == "learned"
        self.pool: RowAdam | None = None
        self.labels = self.held = None
        if self.learned:
            count = config.num_images
            labels = (torch.arange(count) % num_classes)[torch.randperm(count, generator=rng)]
            self.pool = RowAdam(torch.randn(count, config.latent_dim, generator=rng).to(device), config.pool_lr)
            self.held = labels.unique()  # the classes that hold a latent (on the CPU, as the candidates)
            self.labels = labels.to(device)

    def usable(self, candidates: Tensor) -> Tensor:
        """The classes of `candidates` a single-class pass can draw (learned: those holding a latent)."""
        return candidates[torch.isin(candidates, self.held)] if self.learned else candidates

    def pick(self, candidates: Tensor) -> int:
        """The class of a step's single-class pass."""
        return int(candidates[torch.randint(len(candidates), (1,), generator=self.rng)].item())

    def batch(self, label: int | None) -> tuple[Tensor, Tensor | None]:
        """A batch's labels (of every class, or of `label`) and rows of the learned latents (None:
        fresh latents)."""
        if not self.learned:
            labels = torch.randint(self.num_classes, (self.batch_size,), generator=self.rng) if label is None else \
                torch.full((self.batch_size,), label, dtype=torch.long)
            return labels.to(self.device), None
        members = torch.arange(len(self.labels), device=self.device) if label is None else \
            (self.labels == label).nonzero().flatten()
        rows = members[torch.randint(len(members), (self.batch_size,), generator=self.rng).to(self.device)]
        return self.labels[rows], rows

    def draw(self, candidates: Tensor) -> tuple[Tensor, Tensor | None, int | None, Tensor | None, Tensor | None]:
        """A step's mixed-pass labels and latents, and, with learned latents, its single-class
        pass's class, labels and latents (one leaf for both passes, drawn first: a latent may be
        in both). Fresh latents are drawn when a pass runs (`noise`), and the single class after
        the mixed pass: (labels, None, None, None, None)."""
        labels, rows = self.batch(None)
        if not self.learned:
            return labels, None, None, None, None
        label = self.pick(candidates) if len(candidates) else None
        single, single_rows = self.batch(label) if label is not None else (None, rows[:0])
        drawn, where = torch.unique(torch.cat([rows, single_rows]), return_inverse=True)
        leaf = self.pool.draw(drawn)
        return labels, leaf[where[: self.batch_size]], label, single, leaf[where[self.batch_size :]]

    def noise(self, labels: Tensor, z: Tensor | None) -> Tensor:
        """`z`, or fresh latents for `labels`."""
        return z if z is not None else torch.randn(len(labels), self.config.latent_dim, generator=self.rng).to(self.device)

    def optimizer(self, weights: torch.optim.Optimizer) -> torch.optim.Optimizer | _Both:
        """What one step updates: the generator's `weights`, and the learned latents drawn."""
        return _Both(weights, self.pool) if self.learned else weights

    def snapshot(self) -> dict:
        return {"latents": self.pool.pool, "latent_optimizer": self.pool.state_dict()} if self.learned else {}

    def restore(self, state: dict) -> None:
        if self.learned:
            self.pool.pool.copy_(state["latents"])
            self.pool.load_state_dict(state["latent_optimizer"])

    def result(self) -> tuple[Tensor, Tensor] | None:
        """The learned latents and their labels (on the CPU), for `generate`."""
        return (self.pool.pool.cpu(), self.labels.cpu()) if self.learned else None


def _check_run(config: SynthConfig, ranks: Ranks, resume: dict | None, bounds: tuple[Tensor, Tensor] | None) -> None:
    if resume is not None and ranks.world > 1:
        raise ConfigError("resuming is for one process: a state holds one rank's random draws")
    if config.latents == "learned" and ranks.world > 1:
        raise ConfigError("learned latents are for one process: each rank would move its own copy")
    if config.generator_output == "range" and bounds is None:
        raise ConfigError("generator_output 'range' needs the model's input range (bounds)")


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
    several `ranks` (a torchrun job) each draws its own share of every batch (see
    `distributed`); rank 0 alone hands `on_checkpoint` a resumable state every
    `config.checkpoint_every` steps, and `resume` (one process) continues from one to the same
    generator as an uninterrupted run. `bounds`: the model's input range
    (`Preprocess.input_range`), which `config.generator_output` "range" maps the generator's
    output into. With `config.latents` "learned" the result holds the `num_images` latents and
    labels that `generate` draws from (`_Latents`)."""
    _check_run(config, ranks, resume, bounds)
    objective = Objective(teacher, layers, statistics, config)
    if not ranks.is_main:
        on_checkpoint = None
    rng = torch.Generator().manual_seed(config.seed + ranks.rank)
    channels, size, _ = image_shape
    device = model_device(teacher)
    with torch.random.fork_rng(devices=[]):  # a seeded initialisation; the caller's random state is left as it was
        torch.manual_seed(config.seed)
        generator = Generator(statistics.num_classes, channels, size, config.latent_dim, config.width,
                              bounds if config.generator_output == "range" else None, config.label_embedding)
    generator = place(generator, device).train()
    optimizer = torch.optim.Adam(generator.parameters(), lr=config.lr, betas=(0.5, 0.999))
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, [int(config.steps * f) for f in config.lr_milestones],
                                                    gamma=0.1)
    latents = _Latents(config, statistics.num_classes, ranks.share(config.batch_size, "synthesis batch_size"), rng,
                       device)
    first = 1
    if resume is not None:
        first = resume_loop(resume, rng, generator=generator, optimizer=optimizer, schedule=schedule)
        objective.restore(resume)
        latents.restore(resume)
    trainer = data_parallel(generator, ranks)

    def teacher_logits(labels: Tensor, z: Tensor | None) -> Tensor:
        z = latents.noise(labels, z)
        with fast_float(device):
            return teacher(trainer(z, labels)).float()

    emit(on_event, "synthesize", first - 1, config.steps)
    with objective.frozen_teacher(), record_bn_inputs(layers, per_image=False) as stats:
        for step in range(first, config.steps + 1):
            candidates = latents.usable(objective.candidates(step))
            two_passes = len(candidates) > 0
            labels, z, label, single, z_single = latents.draw(candidates)
            stats.clear()
            # DDP syncs gradients once per backward: only the last pass before it prepares that
            with trainer.no_sync() if two_passes and trainer is not generator else nullcontext():
                parts = objective.mixed(stats, teacher_logits(labels, z), labels)
            if two_passes:
                if label is None:  # fresh latents: the class is drawn after the mixed pass, as always
                    label = latents.pick(candidates)
                    single = latents.batch(label)[0]
                stats.clear()
                parts |= objective.single(step, label, stats, teacher_logits(single, z_single), single, rng)
            objective.minimise(parts, latents.optimizer(optimizer))
            schedule.step()
            if on_checkpoint is not None and objective.checkpoint_due(step):
                on_checkpoint({**loop_state(step, rng, generator=generator, optimizer=optimizer, schedule=schedule),
                               **copy.deepcopy({**objective.snapshot(), **latents.snapshot()})})
            objective.progress(step, on_event)
    return objective.result(generator, latents.result())


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
