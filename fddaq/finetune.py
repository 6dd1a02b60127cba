"""Distillation fine-tuning of the fake-quant student from the float teacher.

The student's BatchNorm layers stay in eval mode with frozen statistics and affine parameters
(they are folded at export); its conv/linear weights, biases and quantizer step sizes learn.
The last step is kept: nothing is selected on validation data."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import FinetuneConfig
from .events import EventHandler, emit
from .quant.calibrate import fake_quant_layers


@dataclass(frozen=True)
class FinetuneResult:
    steps: int
    first_loss: float
    last_loss: float
    seconds: float
    selection: str = "last step"

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Per image: a random translation of up to 1/8 of the size (reflect padding) and a
    random horizontal flip."""
    n, _, h, w = x.shape
    pad = max(1, min(h, w) // 8)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(teacher || student) of the temperature-softened distributions, scaled by T^2."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean", log_target=True,
    ) * (t * t)


def finetune(
    student: nn.Module,
    teacher: nn.Module,
    images: Tensor,
    config: FinetuneConfig = FinetuneConfig(),
    synthetic: Tensor | None = None,
    on_event: EventHandler | None = None,
) -> FinetuneResult:
    """Train `student` in place to match `teacher` on augmented batches of real `images`
    mixed with `synthetic` images (`config.synthetic_fraction` of each batch when given)."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed)
    teacher.eval()
    student.eval()  # frozen BatchNorm statistics; fake quantization is mode-independent
    for module in student.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.requires_grad_(False)
    layers = [layer for _, layer in fake_quant_layers(student)]
    scales = [q.log_scale for layer in layers for q in (layer.weight_quant, layer.input_quant)]
    weights = [p for layer in layers for p in (layer.weight, layer.bias) if p is not None]
    optimizer = torch.optim.Adam(
        [{"params": weights, "lr": config.weight_lr}, {"params": scales, "lr": config.scale_lr}]
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / max(1, config.steps)))
    )
    losses: list[float] = []
    emit(on_event, "finetune", 0, config.steps)
    num_synthetic = 0 if synthetic is None else round(config.batch_size * config.synthetic_fraction)
    num_real = config.batch_size - num_synthetic
    for step in range(1, config.steps + 1):
        batch = images[torch.randint(len(images), (num_real,), generator=generator)]
        if num_synthetic:
            picked = synthetic[torch.randint(len(synthetic), (num_synthetic,), generator=generator)]
            batch = torch.cat([batch, picked])
        batch = augment(batch, generator)
        with torch.no_grad():
            target = teacher(batch)
        loss = distillation_loss(student(batch), target, config.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        emit(on_event, "finetune", step, config.steps, loss=losses[-1])
    window = max(1, min(20, len(losses) // 5))
    first = sum(losses[:window]) / window if losses else float("nan")
    last = sum(losses[-window:]) / window if losses else float("nan")
    return FinetuneResult(config.steps, first, last, time.perf_counter() - start)
