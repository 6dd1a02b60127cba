"""FDDA's losses on a pool of images optimised directly, without a generator.

Each class with real calibration images gets `num_images / classes` pool images, started from
augmented views of its own images (`finetune.augment`: a shift and a mirror) plus a little
Gaussian noise. Classes without one (data-free, or the classes a few images do not cover)
start from noise, when they are drawn at all (`classes`). Every step takes, as FDDA's generator
training does, a batch of random pool images for the cross-entropy and the global BNS loss,
and a single-class batch for the cross-entropy and the class's C-BNS and D-BNS losses in the
deep layers; Adam moves the pixels of the images drawn (`RowAdam`). A step costs two teacher
forward and backward passes and an update of those images, at any resolution (the generator
dominated at 224 px)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..checkpoint import loop_state, resume_loop
from ..config import SynthConfig
from ..device import model_device
from ..distributed import Ranks
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


class RowAdam:
    """Adam on the rows of `pool` that a step draws: each image keeps its own moments and step
    count, and only the drawn images move. (torch's Adam over the whole pool would update every
    image each step, and move the images not drawn along their old momentum.)"""

    def __init__(self, pool: Tensor, lr: float, bounds: tuple[Tensor, Tensor] | None = None,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.pool, self.lr, self.bounds, self.betas, self.eps = pool, lr, bounds, betas, eps
        self.m, self.v = torch.zeros_like(pool), torch.zeros_like(pool)
        self.count = torch.zeros(len(pool), device=pool.device)
        self.rows = self.leaf = None

    def draw(self, rows: Tensor) -> Tensor:
        """A leaf copy of the pool images `rows` (distinct) for this step's passes."""
        self.rows = rows
        self.leaf = self.pool[rows].requires_grad_(True)
        return self.leaf

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.leaf is not None:
            self.leaf.grad = None

    @torch.no_grad()
    def step(self) -> None:
        (b1, b2), rows, grad = self.betas, self.rows, self.leaf.grad
        shape = (-1,) + (1,) * (grad.dim() - 1)
        self.count[rows] += 1
        m = self.m[rows].mul_(b1).add_(grad, alpha=1 - b1)
        v = self.v[rows].mul_(b2).addcmul_(grad, grad, value=1 - b2)
        self.m[rows], self.v[rows] = m, v
        t = self.count[rows].view(shape)
        step = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt_().add_(self.eps))
        moved = self.leaf.detach() - self.lr * step
        self.pool[rows] = moved if self.bounds is None else moved.clamp(*self.bounds)

    def state_dict(self) -> dict:
        return {"m": _copy(self.m), "v": _copy(self.v), "count": _copy(self.count)}

    def load_state_dict(self, state: dict) -> None:
        for name in ("m", "v", "count"):
            getattr(self, name).copy_(state[name])


def _copy(tensor: Tensor) -> Tensor:
    """A CPU copy (a resumable state must not alias the live tensors)."""
    return tensor.detach().to("cpu", copy=True)


def optimize_pool(
    teacher: nn.Module,
    layers: list[tuple[str, nn.BatchNorm2d]],
    statistics: ClassStatistics,
    real: Tensor,
    labels: Tensor,
    config: SynthConfig,
    on_event: EventHandler | None = None,
    on_checkpoint: Callable[[dict], None] | None = None,
    resume: dict | None = None,
    bounds: tuple[Tensor, Tensor] | None = None,
    ranks: Ranks = Ranks(),
) -> tuple[Tensor, Tensor, SynthResult]:
    """Optimise `config.num_images` pool images for `config.steps` steps with FDDA's losses
    (`objective.Objective`); (images, labels, result) on the CPU. The pool covers the classes
    that have a real image (all classes when none has). `bounds`: the lowest and highest input
    value per channel, (C, 1, 1) each (`Preprocess.input_range`): pixels stay where a camera's
    can be (unbounded, a third of them left that range). `on_checkpoint` receives a resumable
    state every `config.checkpoint_every` steps; `resume` continues from one to the same
    images as an uninterrupted run. With several `ranks` (a torchrun job) every rank optimises
    the same pool, and rank 0 alone hands out states."""
    objective = Objective(teacher, layers, statistics, config)
    if not ranks.is_main:  # under torchrun every rank optimises the same pool: rank 0 hands out states
        on_checkpoint = None
    rng = torch.Generator().manual_seed(config.seed)
    covered = labels.unique() if len(labels) else torch.arange(statistics.num_classes)
    if resume is None:
        images, pool_labels = initial_pool(real.cpu(), labels.cpu(), covered, config.num_images, config.pool_noise, rng)
    else:
        images, pool_labels = resume["images"].clone(), resume["labels"]
    device = model_device(teacher)
    if bounds is not None:
        bounds = (bounds[0].to(device), bounds[1].to(device))
        images = images.to(device).clamp(*bounds)
    pool = images.to(device)
    pool_labels = pool_labels.to(device)
    optimizer = RowAdam(pool, config.pool_lr, bounds)
    first = 1
    if resume is not None:
        first = resume_loop(resume, rng, optimizer=optimizer)
        objective.restore(resume)

    def state(step: int) -> dict:
        return {**loop_state(step, rng, optimizer=optimizer), "images": _copy(pool), "labels": _copy(pool_labels),
                **objective.snapshot()}

    batch = min(config.batch_size, config.num_images)
    emit(on_event, "synthesize", first - 1, config.steps)
    with objective.frozen_teacher(), record_bn_inputs(layers, per_image=False) as stats:
        for step in range(first, config.steps + 1):
            mixed = torch.randint(len(pool), (batch,), generator=rng).to(device)
            candidates = objective.candidates(step).to(device)
            candidates = candidates[torch.isin(candidates, pool_labels)]
            label, single = None, mixed[:0]
            if len(candidates):
                label = candidates[torch.randint(len(candidates), (1,), generator=rng).item()].item()
                members = (pool_labels == label).nonzero().flatten()
                single = members[torch.randint(len(members), (batch,), generator=rng).to(device)]
            rows, where = torch.unique(torch.cat([mixed, single]), return_inverse=True)
            drawn = optimizer.draw(rows)
            stats.clear()
            parts = objective.mixed(stats, teacher(drawn[where[:batch]]).float(), pool_labels[mixed])
            if label is not None:
                stats.clear()
                parts |= objective.single(step, label, stats, teacher(drawn[where[batch:]]).float(), pool_labels[single], rng)
            objective.minimise(parts, optimizer)
            if on_checkpoint is not None and objective.checkpoint_due(step):
                on_checkpoint(state(step))
            objective.progress(step, on_event)
    return pool.cpu(), pool_labels.cpu(), objective.result(None)
