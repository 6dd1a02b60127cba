"""Train FDDA's generator against the float model, then draw labelled synthetic images."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..config import SynthConfig
from ..device import fast_float, model_device, place
from ..distributed import current, data_parallel
from ..errors import ConfigError
from ..events import EventHandler, emit
from ..stats import ClassStatistics, deep_layer_start, record_bn_inputs
from .generator import Generator
from .losses import centralized_bns_loss, class_loss, distorted_bns_loss, global_bns_loss

LOSS_NAMES = ("ce", "bns", "cbns", "dbns", "ce_single", "total")


@dataclass
class SynthResult:
    generator: Generator
    deep_start: int
    num_bn_layers: int
    classes_with_center: int
    misclassified_excluded: int
    curves: dict[str, list[float]] = field(default_factory=dict)  # per loss, one value per step
    seconds: float = 0.0

    def summary(self) -> dict:
        window = max(1, min(50, len(self.curves["total"]) // 10)) if self.curves.get("total") else 1
        return {
            "deep_start": self.deep_start,
            "num_bn_layers": self.num_bn_layers,
            "classes_with_center": self.classes_with_center,
            "misclassified_excluded": self.misclassified_excluded,
            "seconds": self.seconds,
            "seconds_per_step": self.seconds / max(1, len(self.curves.get("total", []))),
            "final_losses": {k: sum(v[-window:]) / window for k, v in self.curves.items() if v},
        }


def train_generator(
    teacher: nn.Module,
    layers: list[tuple[str, nn.BatchNorm2d]],
    statistics: ClassStatistics,
    image_shape: tuple[int, int, int],
    config: SynthConfig = SynthConfig(),
    on_event: EventHandler | None = None,
) -> SynthResult:
    """Train a conditional generator whose images match the teacher's BN running statistics
    (all layers) and, batch by batch for one class at a time, that class's real BNS center in
    the deep layers (C-BNS) and the center plus noise (D-BNS). Under torchrun each rank draws
    its own share of every batch (see `distributed`)."""
    start = time.perf_counter()
    ranks = current()
    batch_size = ranks.share(config.batch_size, "synthesis batch_size")
    torch.manual_seed(config.seed)
    rng = torch.Generator().manual_seed(config.seed + ranks.rank)
    channels, size, _ = image_shape
    num_classes = statistics.num_classes
    deep = deep_layer_start(len(layers)) if config.deep_start is None else config.deep_start
    if deep >= len(layers):
        raise ConfigError(f"deep_start={deep} but the model has only {len(layers)} BatchNorm layers")
    device = model_device(teacher)
    generator = place(Generator(num_classes, channels, size, config.latent_dim, config.width), device).train()
    optimizer = torch.optim.Adam(generator.parameters(), lr=config.lr, betas=(0.5, 0.999))
    milestones = [int(config.steps * f) for f in config.lr_milestones]
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    running = [(bn.running_mean, bn.running_var) for _, bn in layers]
    centers = {
        flag: ([m.to(device) for m in means], [v.to(device) for v in variances], has_center)
        for flag, (means, variances, has_center) in ((f, statistics.centers(f)) for f in (False, True))
    }
    use_centers = config.cbns_weight > 0 or config.dbns_weight > 0 or config.ce_single_weight > 0
    warmup = int(config.center_warmup * config.steps)
    curves: dict[str, list[float]] = {name: [] for name in LOSS_NAMES}
    teacher.eval()
    frozen = [p for p in teacher.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    trainer = data_parallel(generator, ranks)

    def teacher_logits(labels: Tensor) -> Tensor:
        z = torch.randn(len(labels), config.latent_dim, generator=rng).to(device)
        with fast_float(device):
            return teacher(trainer(z, labels)).float()

    emit(on_event, "synthesize", 0, config.steps)
    try:
        with record_bn_inputs(layers, per_image=False) as stats:
            for step in range(1, config.steps + 1):
                mean_c, var_c, has_center = centers[step > warmup]
                candidates = has_center.nonzero().flatten()
                two_passes = use_centers and len(candidates) > 0
                labels = torch.randint(num_classes, (batch_size,), generator=rng).to(device)
                stats.clear()
                # DDP syncs gradients once per backward: only the last pass before it prepares that
                with trainer.no_sync() if two_passes and trainer is not generator else nullcontext():
                    logits = teacher_logits(labels)
                parts = {"ce": class_loss(logits, labels), "bns": global_bns_loss(stats, running)}
                if two_passes:
                    label = candidates[torch.randint(len(candidates), (1,), generator=rng)].item()
                    single = torch.full((batch_size,), label, dtype=torch.long, device=device)
                    stats.clear()
                    logits = teacher_logits(single)
                    deep_stats = stats[deep:]
                    targets = [(m[label], v[label]) for m, v in zip(mean_c[deep:], var_c[deep:])]
                    parts["cbns"] = centralized_bns_loss(deep_stats, targets)
                    parts["dbns"] = distorted_bns_loss(
                        deep_stats, targets, config.noise_mean_std, config.noise_var_std, rng
                    )
                    parts["ce_single"] = class_loss(logits, single)
                weights = {
                    "ce": config.ce_weight, "bns": config.bns_weight, "cbns": config.cbns_weight,
                    "dbns": config.dbns_weight, "ce_single": config.ce_single_weight,
                }
                total = sum(weights[k] * v for k, v in parts.items())
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                schedule.step()
                for name, value in parts.items():
                    curves[name].append(value.item())
                curves["total"].append(total.item())
                emit(on_event, "synthesize", step, config.steps, loss=curves["total"][-1])
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return SynthResult(
        generator, deep, len(layers), int(centers[True][2].sum()), statistics.misclassified,
        curves, time.perf_counter() - start,
    )


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
