"""The whole quantization job: load, plan, calibrate, fine-tune, evaluate.

Stages to come plug in here: FDDA synthesis feeds `finetune` with synthetic images beside
the real ones; recipes choose the fine-tuning configuration."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from .checkpoint import ModelInfo
from .config import RunConfig
from .data import ImageSet, Preprocess, load_image_folder, preset
from .errors import ConfigError, DataError
from .evaluate import predict, top1
from .events import EventHandler
from .finetune import FinetuneResult, finetune
from .models import input_channels, layer_execution_order, load_float_model, num_outputs
from .quant.calibrate import calibrate
from .quant.plan import LayerPlan, resolve_layer_plan
from .quant.prepare import prepare
from .zoo import ZOO


@dataclass(frozen=True)
class PreprocessOptions:
    """User choices; unset fields come from the preset (or the zoo model's own preset)."""

    preset: str | None = None
    input_size: int | None = None
    resize: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


@dataclass(frozen=True)
class QuantizeJob:
    model_path: Path
    arch: str
    calib_dir: Path
    val_dir: Path | None = None
    num_classes: int | None = None
    preprocess: PreprocessOptions = field(default_factory=PreprocessOptions)
    config: RunConfig = field(default_factory=RunConfig)


@dataclass
class QuantizeResult:
    model: nn.Module  # fake-quant, eval mode
    float_model: nn.Module
    plan: LayerPlan
    info: ModelInfo
    calib: ImageSet
    val: ImageSet | None
    finetune: FinetuneResult
    float_top1: float | None  # on val, percent
    quant_top1: float | None
    timings: dict[str, float]


def resolve_preprocess(arch: str, channels: int, options: PreprocessOptions) -> Preprocess:
    """The preset (explicit, else the zoo model's), with every explicitly given field on top."""
    name = options.preset
    if name is None and arch.startswith("fddaq:") and arch[6:] in ZOO:
        name = ZOO[arch[6:]].preset
    overrides = {k: getattr(options, k) for k in ("input_size", "resize", "mean", "std") if getattr(options, k) is not None}
    if name is not None:
        return replace(preset(name, channels), **overrides)
    missing = [f"--{k.replace('_', '-')}" for k in ("input_size", "mean", "std") if k not in overrides]
    if missing:
        raise ConfigError(f"preprocessing of {arch} is unknown: give --preset or {', '.join(missing)}")
    return Preprocess(channels=channels, **overrides)


def quantize(job: QuantizeJob, on_event: EventHandler | None = None) -> QuantizeResult:
    """Run the whole job on CPU and return the fine-tuned fake-quant model with its numbers."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    float_model = load_float_model(job.model_path, job.arch, job.num_classes)
    preprocess = resolve_preprocess(job.arch, input_channels(float_model), job.preprocess)
    example = torch.zeros(1, preprocess.channels, preprocess.input_size, preprocess.input_size)
    order = layer_execution_order(float_model, example)
    classes = num_outputs(float_model, order)
    calib = load_image_folder(job.calib_dir, preprocess)
    class_names = calib.class_names if calib.labelled else tuple(str(i) for i in range(classes))
    if len(class_names) > classes:
        raise DataError(f"{job.calib_dir} has {len(class_names)} class folders but the model has {classes} outputs")
    val = load_image_folder(job.val_dir, preprocess, class_names) if job.val_dir is not None else None
    if val is not None and not val.labelled:
        raise DataError(f"{job.val_dir} must hold one folder per class to measure accuracy")
    timings["load"] = time.perf_counter() - start

    start = time.perf_counter()
    plan = resolve_layer_plan(float_model, order, job.config.quant)
    model = prepare(float_model, plan)
    calibrate(model, calib.images, job.config.calibration, on_event=on_event)
    timings["calibrate"] = time.perf_counter() - start

    start = time.perf_counter()
    tuned = finetune(model, float_model, calib.images, job.config.finetune, on_event=on_event)
    timings["finetune"] = time.perf_counter() - start

    float_top1 = quant_top1 = None
    if val is not None:
        start = time.perf_counter()
        float_top1 = top1(predict(float_model, val.images), val.labels)
        quant_top1 = top1(predict(model, val.images), val.labels)
        timings["evaluate"] = time.perf_counter() - start
    info = ModelInfo(job.arch, job.num_classes, preprocess, class_names)
    return QuantizeResult(model.eval(), float_model, plan, info, calib, val, tuned, float_top1, quant_top1, timings)

