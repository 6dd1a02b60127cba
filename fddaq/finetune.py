"""Distillation fine-tuning of the fake-quant student from the float teacher.

The student's BatchNorm layers stay in eval mode with frozen statistics and affine parameters
(they are folded at export); its conv/linear weights, biases and (per recipe) quantizer step
sizes learn. The last step is kept: nothing is selected on validation data. The loop hands
out its whole state every few steps and when interrupted, and continues from such a state to
the same result as an uninterrupted run."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import loop_state, resume_loop
from .config import FinetuneConfig
from .device import fast_float, model_device
from .distributed import Ranks, average, data_parallel
from .errors import ConfigError
from .evaluate import predict, top1
from .events import EventHandler, curve_end, emit
from .quant.modules import QuantizedModel, activation_quantizers, observing, quant_layers

Checkpointer = Callable[[dict], None]


@dataclass(frozen=True)
class FinetuneResult:
    steps: int
    first_loss: float
    last_loss: float
    seconds: float
    holdout_images: int
    holdout_top1: float | None  # student top-1 on the held-out calibration images, last step
    resumed_from: int | None = None
    selection: str = "last step"

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def split_holdout(labels: Tensor, fraction: float, seed: int, smallest: int = 5) -> tuple[Tensor, Tensor]:
    """Indices (train, holdout): `fraction` of each class with at least `smallest` images (at
    least one image of such a class), chosen at random with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    train, holdout = [], []
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        count = max(1, round(fraction * len(members))) if fraction > 0 and len(members) >= smallest else 0
        holdout.append(members[:count])
        train.append(members[count:])
    return torch.cat(train).sort().values, torch.cat(holdout).sort().values


def views(images: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """`count` views of `images` (every image once when there are more): each image once as
    it is, the rest augmented (`augment`)."""
    found = images[torch.arange(max(count, len(images))) % len(images)].clone()
    found[len(images):] = augment(found[len(images):], generator)
    return found


def augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Per image: a random translation of up to 1/8 of the size (reflect padding) and a
    random horizontal flip."""
    n, _, h, w = x.shape
    pad = max(1, min(h, w) // 8)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].to(x.device)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].to(x.device)
    images = torch.arange(n, device=x.device)[:, None, None, None]
    out = padded[images, torch.arange(x.shape[1], device=x.device)[None, :, None, None], rows, cols]
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(teacher || student) of the temperature-softened distributions, scaled by T^2."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean", log_target=True,
    ) * (t * t)


def student_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, config: FinetuneConfig) -> Tensor:
    """kd_weight * distillation + ce_weight * cross-entropy on the labels."""
    loss = config.kd_weight * distillation_loss(student_logits, teacher_logits, config.temperature)
    if config.ce_weight:
        loss = loss + config.ce_weight * F.cross_entropy(student_logits, labels)
    return loss


class _Batches:
    """Seeded batches mixing real and synthetic images (with their labels), augmented per image;
    under torchrun, this rank's share of each global batch, from its own seed."""

    def __init__(self, config: FinetuneConfig, real: tuple[Tensor, Tensor], synthetic: tuple[Tensor, Tensor] | None,
                 ranks: Ranks = Ranks()):
        self.config, self.real, self.synthetic = config, real, synthetic
        self.batch_size = ranks.share(config.batch_size, "batch_size")
        self.num_synthetic = 0 if synthetic is None else round(self.batch_size * config.synthetic_fraction)
        self.generator = torch.Generator().manual_seed(config.seed + ranks.rank)

    def next(self) -> tuple[Tensor, Tensor]:
        parts = [(self.real, self.batch_size - self.num_synthetic)]
        if self.num_synthetic:
            parts.append((self.synthetic, self.num_synthetic))
        images, labels = [], []
        for (x, y), count in parts:
            picked = torch.randint(len(x), (count,), generator=self.generator).to(x.device)
            images.append(x[picked])
            labels.append(y[picked])
        batch = torch.cat(images)
        if self.config.augment:
            batch = augment(batch, self.generator)
        return batch, torch.cat(labels)


def _step_sizes(student: nn.Module) -> list[nn.Parameter]:
    """The log step size of every weight and activation quantizer."""
    return [*(layer.weight_quant.log_scale for layer in quant_layers(student)),
            *(quant.log_scale for quant in activation_quantizers(student))]


def _optimizer(student: QuantizedModel, config: FinetuneConfig) -> torch.optim.Optimizer:
    groups = [{"params": student.trainable_weights(), "lr": config.weight_lr}]
    if config.learn_scales:
        groups.append({"params": _step_sizes(student), "lr": config.scale_lr})
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=config.momentum, nesterov=config.momentum > 0,
                               weight_decay=config.weight_decay)
    return torch.optim.Adam(groups, weight_decay=config.weight_decay)


def _set_weight_ranges(student: QuantizedModel) -> None:
    weights = student.layer_weights()
    for layer in quant_layers(student):
        layer.weight_quant.set_min_max(weights[layer.name])


def _sync_observers(student: nn.Module, ranks: Ranks) -> None:
    """Every rank's observed activation ranges replaced by their mean over the ranks."""
    quantizers = [quant for quant in activation_quantizers(student) if quant.observed_range() is not None]
    if ranks.world == 1 or not quantizers:
        return
    observed = torch.stack([q.observed for q in quantizers])
    for q, (lo, hi) in zip(quantizers, average(observed, ranks).tolist()):
        q.set_observed(lo, hi)


@contextlib.contextmanager
def _trainable(student: QuantizedModel, learn_scales: bool) -> Iterator[None]:
    """`student` as fine-tuning trains it: eval mode (frozen BatchNorm statistics; fake
    quantization is mode-independent), BatchNorm parameters fixed, and step sizes learnable
    only when `learn_scales` (fixed ones need no gradient: about 10% of a step); afterwards
    every step size takes a gradient again."""
    student.eval()
    for module in student.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.requires_grad_(False)
    scales = _step_sizes(student)
    for scale in scales:
        scale.requires_grad_(learn_scales)
    try:
        yield
    finally:
        for scale in scales:
            scale.requires_grad_(True)


def _step(student: QuantizedModel, trainer: nn.Module, teacher: nn.Module, batch: tuple[Tensor, Tensor],
          optimizer: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LRScheduler, config: FinetuneConfig,
          observe: bool, ranks: Ranks) -> float:
    """One step on `batch` (images, labels) through `trainer` (the student, or its DDP wrapper);
    `observe`: the activation observers move their ranges in it (`config.act_ema`). Its loss."""
    images, labels = batch
    if not config.learn_scales:
        _set_weight_ranges(student)
    with torch.no_grad(), fast_float(images.device):
        target = teacher(images).float()
    with observing(activation_quantizers(student), config.act_ema if observe else None):
        loss = student_loss(trainer(images), target, labels, config)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()
    if observe:
        _sync_observers(student, ranks)  # after backward: its graph holds the zero points
    return loss.item()


def finetune(
    student: QuantizedModel,
    teacher: nn.Module,
    real: tuple[Tensor, Tensor],
    config: FinetuneConfig = FinetuneConfig(),
    synthetic: tuple[Tensor, Tensor] | None = None,
    on_event: EventHandler | None = None,
    on_checkpoint: Checkpointer | None = None,
    resume: dict | None = None,
    ranks: Ranks = Ranks(),
) -> FinetuneResult:
    """Train `student` in place to match `teacher` on batches of real (images, labels) mixed
    with synthetic ones (`config.synthetic_fraction` of each batch when given).

    `on_checkpoint(state)` receives a resumable state before the first step and every
    `checkpoint_every` steps (an interrupted run loses at most those steps); `resume`
    continues from such a state to the same result as an uninterrupted run. With several
    `ranks` (a torchrun job, which must all call it) each trains on its own share of every
    batch (see `distributed`); rank 0 alone hands out states."""
    start = time.perf_counter()
    device = model_device(student)
    if resume is not None and ranks.world > 1:
        raise ConfigError("resuming is for one process: a state holds one rank's random draws")
    if not ranks.is_main:
        on_checkpoint = None
    train_idx, holdout_idx = split_holdout(real[1], config.holdout, config.seed)
    holdout = (real[0][holdout_idx], real[1][holdout_idx])

    def on_device(images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:  # pre-decoded: moved once
        return images.to(device), labels.to(device)

    batches = _Batches(
        config, on_device(real[0][train_idx], real[1][train_idx]), None if synthetic is None else on_device(*synthetic),
        ranks,
    )

    def holdout_top1() -> float | None:
        return top1(predict(student, holdout[0], ranks=ranks), holdout[1]) if len(holdout[1]) else None

    teacher.eval()
    observe_steps = 0 if config.learn_scales else math.ceil(config.observe_fraction * config.steps)
    losses: list[float] = []
    with _trainable(student, config.learn_scales):
        optimizer = _optimizer(student, config)
        trainer = data_parallel(student, ranks)  # after requires_grad is settled: DDP syncs what trains
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / max(1, config.steps)))
        )
        first = 1
        if resume is not None:
            first = resume_loop(resume, batches.generator, student=student, optimizer=optimizer, schedule=schedule)
            losses = resume["losses"].tolist()

        def state(step: int) -> dict:
            """A snapshot of everything the next steps depend on."""
            return {**loop_state(step, batches.generator, student=student, optimizer=optimizer, schedule=schedule),
                    "losses": torch.tensor(losses, dtype=torch.float64)}

        emit(on_event, "finetune", first - 1, config.steps)
        if on_checkpoint is not None and resume is None:
            on_checkpoint(state(0))
        for step in range(first, config.steps + 1):
            losses.append(_step(student, trainer, teacher, batches.next(), optimizer, schedule, config,
                                step <= observe_steps, ranks))
            metrics = {"loss": losses[-1]}
            if step == config.steps or step % config.checkpoint_every == 0:
                accuracy = holdout_top1()
                if accuracy is not None:
                    metrics["holdout_top1"] = accuracy
                if on_checkpoint is not None and step < config.steps:
                    on_checkpoint(state(step))
            emit(on_event, "finetune", step, config.steps, **metrics)
    if not config.learn_scales:
        _set_weight_ranges(student)  # freeze the exported scales at the final weights
    return FinetuneResult(
        config.steps, curve_end(losses, first=True), curve_end(losses), time.perf_counter() - start, len(holdout[1]),
        holdout_top1(), None if resume is None else resume["step"],
    )
