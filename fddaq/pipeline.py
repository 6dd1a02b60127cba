"""The jobs behind the commands: load what the user points at, synthesize, quantize.

quantize: load -> plan -> calibrate (real images) -> FDDA synthesis -> block-wise
reconstruction (per recipe) -> fine-tune by distillation on real + synthetic images -> evaluate. Export and verification follow in
`exporters/`, which this core library never imports."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import ModelInfo
from .config import BudgetConfig, CalibrationConfig, QuantConfig, RunConfig, SynthConfig
from .data import ImageSet, Preprocess, load_image_folder, preset
from .device import pin, place, placed
from .distributed import Ranks, current
from .errors import ConfigError, DataError
from .evaluate import class_logits, layer_sqnr, predict, top1
from .events import EventHandler, emit
from .finetune import FinetuneResult, finetune, split_holdout
from .models import input_channels, load_float_model
from .precision import MixedPrecision, check_budget, search
from .quant.calibrate import calibrate
from .quant.capture import Capture, capture, resolve_output
from .quant.fold import fold_batch_norms
from .quant.modules import QuantizedModel, Selected
from .quant.plan import LayerPlan, resolve_layer_plan
from .quant.prepare import prepare
from .recipes import synthesis_choice
from .reconstruct import ReconstructResult, reconstruct, view_pool
from .stats import ClassStatistics, batchnorm_layers, class_statistics, deep_layer_start
from .synth.pool import optimize_pool
from .synth.quality import QualityProbe, SetQuality
from .synth.train import generate, train_generator
from .zoo import ZOO

CPU = torch.device("cpu")


@dataclass(frozen=True)
class PreprocessOptions:
    """User choices; unset fields come from the preset (or the zoo model's own preset)."""

    preset: str | None = None
    input_size: int | None = None
    resize: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Source:
    """What the user points at: a float model, its architecture and image folders.
    `classes_file` lists the model's class folder names, one per line (line i = class i);
    `arch_args` are passed to the architecture factory; `output` names (or indexes) the output
    that is scored and distilled (`capture.resolve_output`)."""

    model_path: Path
    arch: str
    calib_dir: Path | None = None  # needed by load_inputs, not by load_float
    val_dir: Path | None = None
    num_classes: int | None = None
    classes_file: Path | None = None
    preprocess: PreprocessOptions = field(default_factory=PreprocessOptions)
    trust_model: bool = False  # unpickle a whole-model file (runs code from it)
    arch_args: tuple[str, ...] = ()
    output: str | None = None


@dataclass
class Inputs:
    float_model: nn.Module  # as the architecture builds it (all its outputs)
    info: ModelInfo
    capture: Capture
    calib: ImageSet  # labels: folder labels, or the float model's predictions for a flat folder
    val: ImageSet | None
    seconds: float
    calib_top1: float | None = None  # the float model's top-1 on (up to ~CLASS_ORDER_IMAGES) labelled calibration images

    @property
    def num_classes(self) -> int:
        return len(self.info.class_names)

    def fingerprint(self) -> str:
        """A hash of what a run learns from: the float model's weights, the calibration labels
        and images (their shape, and every image of a spread sample of up to 256: hashing
        every image of a big set would take minutes). A resumable state made from other ones
        must not be continued."""
        digest = hashlib.sha256()
        tensors = [v for v in self.float_model.state_dict().values() if isinstance(v, Tensor)]
        sample = self.calib.images[spread(len(self.calib), 256)]
        digest.update(str(tuple(self.calib.images.shape)).encode())
        for tensor in [*tensors, self.calib.labels, sample]:
            digest.update(str((tensor.dtype, tuple(tensor.shape))).encode())
            digest.update(memoryview(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()))
        return digest.hexdigest()

    def class_order_warning(self) -> str | None:
        """A warning when the float model scores labelled calibration images near chance (within
        a quarter of the way from chance to 100%): the class folders then rarely follow the
        model's class order."""
        chance = 100.0 / self.num_classes
        if self.calib_top1 is None or self.calib_top1 >= chance + (100.0 - chance) / 4:
            return None
        return (f"the float model's top-1 on the labelled calibration images is {self.calib_top1:.1f}%, near chance "
                f"({chance:.1f}%): the class folders probably do not follow the model's class order")

    @property
    def teacher(self) -> nn.Module:
        """The float model returning its scored output."""
        return Selected(self.float_model, self.info.output)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.info.preprocess.input_shape


def resolve_preprocess(arch: str, channels: int, options: PreprocessOptions) -> Preprocess:
    """The preset (explicit, else the zoo model's), with every explicitly given field on top.
    An input size given without a resize scales the preset's resize in the preset's ratio
    (imagenet at 64 px: resize 73, crop 64; not resize 256, crop the centre 64)."""
    name = options.preset
    if name is None and arch.startswith("fddaq:") and arch[6:] in ZOO:
        name = ZOO[arch[6:]].preset
    overrides = {k: getattr(options, k) for k in ("input_size", "resize", "mean", "std") if getattr(options, k) is not None}
    if name is not None:
        base = preset(name, channels)
        if "input_size" in overrides and "resize" not in overrides and base.resize is not None:
            overrides["resize"] = max(overrides["input_size"], round(overrides["input_size"] * base.resize / base.input_size))
        return replace(base, **overrides)
    missing = [f"`{k}`" for k in ("input_size", "mean", "std") if k not in overrides]
    if missing:
        raise ConfigError(f"preprocessing of {arch} is unknown: give `preset` or {', '.join(missing)}")
    return Preprocess(channels=channels, **overrides)


def _class_names(source: Source, calib_dir_names: tuple[str, ...], outputs: int) -> tuple[str, ...]:
    if source.classes_file is not None:
        path = Path(source.classes_file)
        if not path.is_file():
            raise DataError(f"classes file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the first name
        except UnicodeDecodeError as exc:
            raise DataError(f"classes file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        names = tuple(line.strip() for line in text.splitlines() if line.strip())
        if len(names) != outputs:
            raise DataError(f"{path} lists {len(names)} classes but the model has {outputs} outputs")
        seen: dict[str, int] = {}
        for line, name in enumerate(names, 1):
            if name in seen:
                raise DataError(f"{path} lists class {name!r} twice (lines {seen[name]} and {line} of the names)")
            seen[name] = line
        return names
    if len(calib_dir_names) == outputs:
        return calib_dir_names
    if len(calib_dir_names) > outputs:
        raise DataError(f"{source.calib_dir} has {len(calib_dir_names)} class folders but the model has {outputs} outputs")
    raise DataError(
        f"{source.calib_dir} has {len(calib_dir_names)} class folders for a model with {outputs} outputs: "
        "give `classes` FILE (one folder name per line, line i = class i) to say which classes they are"
    )


@dataclass
class FloatModel:
    model: nn.Module
    preprocess: Preprocess
    capture: Capture  # what the model computes (its layers, folds, outputs)
    output: str  # the scored output

    @property
    def output_shape(self) -> tuple[int, ...]:
        """The scored output's shape without the batch dimension."""
        return next(o.shape for o in self.capture.outputs if o.name == self.output)

    @property
    def classes(self) -> int:
        """Size of the scored output's dimension 1 (classes)."""
        return self.output_shape[0] if self.output_shape else 1

    @property
    def dense(self) -> bool:
        """Whether the scored output has positions besides classes (segmentation maps)."""
        return len(self.output_shape) > 1


def load_float(source: Source) -> FloatModel:
    """The float model of `source` (loaded safely unless `trust_model`), its preprocessing and
    what it computes, captured on one example (a `ModelError` names what it cannot run)."""
    model = load_float_model(source.model_path, source.arch, source.num_classes, source.trust_model, source.arch_args)
    preprocess = resolve_preprocess(source.arch, input_channels(model), source.preprocess)
    # a batch of 2: a forward that only runs on one image fails here, not in the exported graph
    example = torch.zeros(2, *preprocess.input_shape)
    found = capture(model, example)
    return FloatModel(model, preprocess, found, resolve_output(found.outputs, source.output))


def plan_layers(model: FloatModel, quant: QuantConfig) -> LayerPlan:
    """The layer plan `quantize` follows (no images needed)."""
    return resolve_layer_plan(model.capture, quant)


CLASS_ORDER_IMAGES = 128  # calibration images the float model scores to check the class order


def spread(count: int, most: int) -> slice:
    """At most `most` of `count` items, spread evenly over them (every k-th)."""
    return slice(None, None, max(1, -(-count // most)))


def load_inputs(source: Source, device: torch.device = CPU, loaded: FloatModel | None = None) -> Inputs:
    """Load the float model (safely; `loaded` when already done) and decode the image folders
    for it, pinned in host memory when they are bound for a GPU `device` (the model stays on
    the CPU)."""
    start = time.perf_counter()
    loaded = loaded or load_float(source)
    float_model, preprocess = loaded.model, loaded.preprocess
    teacher = Selected(float_model, loaded.output)
    outputs = loaded.classes
    names = None
    if source.classes_file is not None:
        names = _class_names(source, (), outputs)
    if source.calib_dir is None:  # data-free synthesis needs no image
        names = names or tuple(str(i) for i in range(outputs))
        calib = ImageSet(torch.zeros(0, *preprocess.input_shape), torch.zeros(0, dtype=torch.long), names, ())
    else:
        calib = load_image_folder(source.calib_dir, preprocess, names, pin_memory=pin(device))
    calib_top1 = None
    if calib.labelled:
        names = names or _class_names(source, calib.class_names, outputs)
        sample = spread(len(calib), CLASS_ORDER_IMAGES)  # over the sorted classes
        calib_top1 = top1(predict(teacher, calib.images[sample]), calib.labels[sample]) if len(calib) else None
    else:
        names = names or tuple(str(i) for i in range(outputs))
        calib = replace(calib, labels=class_logits(predict(teacher, calib.images)).argmax(1), class_names=names)
    val = None
    if source.val_dir is not None:
        val = load_image_folder(source.val_dir, preprocess, names, pin_memory=pin(device))
        if not val.labelled:
            raise DataError(f"{source.val_dir} must hold one folder per class to measure accuracy")
    info = ModelInfo(source.arch, source.num_classes, preprocess, names, source.arch_args, loaded.output)
    return Inputs(float_model, info, loaded.capture, calib, val, time.perf_counter() - start, calib_top1)


def search_plan(inputs: Inputs, quant: QuantConfig, budget: BudgetConfig,
                calibration: CalibrationConfig = CalibrationConfig(), on_event: EventHandler | None = None,
                device: torch.device = CPU, synthetic: Tensor | None = None) -> MixedPrecision:
    """The weight bits for `budget` (`precision.search`), searched on the calibration images (and
    `synthetic` ones) on `device`: a plan `QuantConfig.layers` + its `overrides` reproduce."""
    require_calibration(inputs)
    with placed(inputs.float_model, device):
        return search(inputs.float_model, inputs.capture, inputs.info.output, quant, budget, inputs.calib.images,
                      inputs.calib.labels, calibration.seed, synthetic, calibration, on_event)


MAX_CURVE_POINTS = 500
SQNR_IMAGES = 256  # images for the per-layer SQNR


@dataclass
class Synthesis:
    images: Tensor  # (N, C, H, W) in model-input space
    labels: Tensor  # (N,) int64
    report: SynthesisReport
    seconds: float


@dataclass(frozen=True)
class SynthesisReport:
    """What a synthesis made, and how good its images are: its `method` ("pool", "generator",
    or "file": images made before, from `source`), the BatchNorm layers it aligns
    (`num_bn_layers`, the deep ones from `deep_start`), the classes with a BNS center and the
    misclassified calibration images left out of the centers, the number of `images`, their
    `quality` and that of held-out real images (by set: "synthetic", "real_val"); for a
    synthesis that ran, its seconds, each loss term's final value and its `curves` (one value
    every `curves["every_n_steps"]` steps)."""

    method: str
    deep_start: int
    num_bn_layers: int
    classes_with_center: int
    misclassified_excluded: int
    images: int
    quality: dict[str, SetQuality]
    source: str | None = None
    seconds: float | None = None
    seconds_per_step: float | None = None
    final_losses: dict[str, float] | None = None
    curves: dict | None = None

    def to_json(self) -> dict:
        found = {f.name: getattr(self, f.name) for f in fields(self)}
        return {**found, "quality": {name: quality.to_json() for name, quality in self.quality.items()}}

    @classmethod
    def from_json(cls, data: dict) -> SynthesisReport:
        return cls(**{**data, "quality": {name: SetQuality(**q) for name, q in data["quality"].items()}})


def synthesize(
    inputs: Inputs, config: SynthConfig, on_event: EventHandler | None = None, real_images: bool = True,
    device: torch.device = CPU, on_checkpoint: Callable[[dict], None] | None = None, resume: dict | None = None,
    ranks: Ranks = Ranks(),
) -> Synthesis:
    """Train FDDA's generator on the calibration images' BNS centers and draw
    `config.num_images` labelled images; measure them against the calibration images' centers
    (and held-out real images). Without `real_images` (data-free) the generator learns from
    the BN running statistics alone; the real images then only serve the measurement. Runs on
    `device`; the images come back on the CPU. `on_checkpoint` receives resumable states of
    the synthesis loop; `resume` continues from one. `ranks`: the processes of a torchrun job,
    which must all call it."""
    with placed(inputs.float_model, device):
        return _synthesize(inputs, config, on_event, real_images, on_checkpoint, resume, ranks)


def require_calibration(inputs: Inputs, real_images: bool = True) -> None:
    """Only data-free synthesis (`real_images` False) runs without calibration images."""
    if real_images and not len(inputs.calib):
        raise ConfigError("calibration images are needed (`calib` DIR); only data-free synthesis runs without them")


def check_trainable(model: FloatModel, config: RunConfig | None = None) -> None:
    """Synthesis and fine-tuning distil class logits: a scored output with positions (a
    segmentation map) is refused before any work, for a `quantize` run of `config` that
    fine-tunes or synthesizes, and for synthesis alone (`config` None)."""
    synthesizes = config is not None and config.synth.num_images > 0 and (
        not config.real_images or config.finetune.steps > 0 or config.reconstruct.iterations > 0)
    needs_logits = config is None or config.finetune.steps > 0 or synthesizes
    if model.dense and needs_logits:
        raise ConfigError(
            f"the scored output {model.output!r} has shape {model.output_shape} (classes and positions): fine-tuning and FDDA "
            "synthesis distil class logits [N, classes]; give `output` for a logits output"
            + ("" if config is None else ", or use `recipe` reconstruct (without `synthetic`) or ptq")
        )


def _synthesize(inputs: Inputs, config: SynthConfig, on_event: EventHandler | None, real_images: bool,
                on_checkpoint: Callable[[dict], None] | None, resume: dict | None, ranks: Ranks) -> Synthesis:
    start = time.perf_counter()
    require_calibration(inputs, real_images)
    model, layers, statistics = _teacher_statistics(inputs)
    teacher = statistics if real_images else ClassStatistics.without_images(layers, inputs.num_classes)
    if config.method == "pool":
        used = len(inputs.calib) if real_images else 0  # data-free: the pool starts from noise
        images, labels, result = optimize_pool(model, layers, teacher, inputs.calib.images[:used],
                                               inputs.calib.labels[:used], config, on_event, on_checkpoint, resume,
                                               inputs.info.preprocess.input_range(), ranks)
    else:
        result = train_generator(model, layers, teacher, inputs.input_shape, config, on_event, on_checkpoint, resume,
                                 inputs.info.preprocess.input_range(), ranks)
        images, labels = generate(result.generator, config.num_images, config.seed, on_event=on_event, latents=result.latents)
    stride = spread(len(result.curves["total"]), MAX_CURVE_POINTS).step
    report = SynthesisReport(
        config.method, **result.summary(), images=len(labels),
        quality=_quality(inputs, model, layers, statistics, result.deep_start, images, labels),
        curves={"every_n_steps": stride, **{k: v[::stride] for k, v in result.curves.items()}},
    )
    return Synthesis(images, labels, report, time.perf_counter() - start)


def synthesis_from(inputs: Inputs, images: Tensor, labels: Tensor, origin: str, device: torch.device = CPU) -> Synthesis:
    """Synthetic images made before (`synthetic.pt` of `fddaq synth`), checked against the model
    and measured as a synthesis is; `origin` names them in errors and the report."""
    start = time.perf_counter()
    shape = tuple(images.shape)
    if images.dim() != 4 or shape[1:] != inputs.input_shape or not images.is_floating_point() or not len(images):
        raise DataError(f"{origin} holds images of shape {shape} ({images.dtype}); the model takes float images "
                        f"(N, {', '.join(map(str, inputs.input_shape))}) with N >= 1")
    if labels.dtype != torch.int64 or tuple(labels.shape) != (len(images),):
        raise DataError(f"{origin} holds labels of shape {tuple(labels.shape)} ({labels.dtype}); expected ({len(images)},) int64")
    if labels.min() < 0 or labels.max() >= inputs.num_classes:
        raise DataError(f"{origin} has labels {labels.min().item()}..{labels.max().item()}; the model has {inputs.num_classes} classes")
    if not torch.isfinite(images).all():
        raise DataError(f"{origin} holds non-finite pixel values")
    images = images.float().contiguous()
    with placed(inputs.float_model, device):
        model, layers, statistics = _teacher_statistics(inputs)
        deep = deep_layer_start(len(layers))
        report = SynthesisReport(
            "file", deep, len(layers), int(statistics.centers(exclude_misclassified=True)[2].sum()),
            statistics.misclassified, len(labels),
            _quality(inputs, model, layers, statistics, deep, images, labels) if layers else {}, origin,
        )
    return Synthesis(images, labels, report, time.perf_counter() - start)


def _teacher_statistics(inputs: Inputs) -> tuple[nn.Module, list[tuple[str, nn.BatchNorm2d]], ClassStatistics]:
    """The teacher, its BatchNorm layers and the calibration images' statistics in them."""
    model = inputs.teacher
    layers = batchnorm_layers(model, torch.zeros(1, *inputs.input_shape))
    if not len(inputs.calib):
        return model, layers, ClassStatistics.without_images(layers, inputs.num_classes)
    return model, layers, class_statistics(model, layers, inputs.calib.images, inputs.calib.labels, inputs.num_classes)


def _quality(inputs: Inputs, model: nn.Module, layers: list[tuple[str, nn.BatchNorm2d]], statistics: ClassStatistics,
             deep_start: int, images: Tensor, labels: Tensor) -> dict[str, SetQuality]:
    """Quality figures (`synth.quality`) of synthetic images, and of held-out real ones."""
    probe = QualityProbe(model, layers, statistics, deep_start)
    quality = {"synthetic": probe.measure(images, labels)}
    if inputs.val is not None:
        quality["real_val"] = probe.measure(inputs.val.images, inputs.val.labels)
    return quality


@dataclass
class QuantizeResult:
    model: nn.Module  # fake-quant, eval mode
    inputs: Inputs
    plan: LayerPlan
    synthesis: Synthesis | None
    finetune: FinetuneResult
    float_top1: float | None  # on val, percent
    timings: dict[str, float]
    layer_sqnr: dict[str, float]  # dB per quantized layer's output vs float (val, else calib)
    reconstruct: ReconstructResult | None = None
    synthesis_why: str = ""  # whether FDDA images were used, and why (`recipes.synthesis_choice`)
    config: RunConfig | None = None  # the configuration run, with that choice made (and the bit search's plan)
    precision: MixedPrecision | None = None  # the bit search, when the run had a budget


RESUME_FORMAT = 1  # of `ResumeState.to_dict`: a state of another format is refused


@dataclass(frozen=True)
class ResumeState:
    """What an interrupted run leaves to continue from (`on_checkpoint` receives the latest):
    `config`, the run's `RunConfig` as JSON (its budget, not the plan searched for it);
    `inputs`, `Inputs.fingerprint`; `synthesis`, {images, labels, report} once synthesized;
    `synthesizing`, the synthesis loop's state while it runs; `reconstruct`, the
    reconstruction's state after its last finished unit; `finetune`, the fine-tuning loop's
    state; `plan`, the layer overrides the bit search chose (a resumed run searches again and
    must find the same)."""

    config: str
    inputs: str | None
    synthesis: dict | None = None
    synthesizing: dict | None = None
    reconstruct: dict | None = None
    finetune: dict | None = None
    plan: tuple[str, ...] | None = None

    def to_dict(self) -> dict:
        """Plain values and tensors (what `torch.load(weights_only=True)` reads back), with the format."""
        found = {f.name: getattr(self, f.name) for f in fields(self)}
        return {"format": RESUME_FORMAT, **found, "plan": None if self.plan is None else list(self.plan)}

    @classmethod
    def from_dict(cls, state: object) -> ResumeState:
        """The state `to_dict` wrote; one of another format (another fddaq version) is refused."""
        written = state.get("format") if isinstance(state, dict) else None
        if written != RESUME_FORMAT:
            raise ConfigError(f"the state to resume was written by another version of fddaq (format {written}; this one "
                              f"reads {RESUME_FORMAT})")
        found = {f.name: state.get(f.name) for f in fields(cls)}
        return cls(**{**found, "plan": None if found["plan"] is None else tuple(found["plan"])})


ResumeHandler = Callable[[ResumeState], None]


def quantize(
    source: Source,
    config: RunConfig,
    on_event: EventHandler | None = None,
    on_checkpoint: ResumeHandler | None = None,
    resume: ResumeState | None = None,
    device: torch.device = CPU,
    loaded: FloatModel | None = None,
    synthetic: tuple[Tensor, Tensor, str] | None = None,
) -> QuantizeResult:
    """Run the whole job on `device` and return the fine-tuned fake-quant model (on the CPU)
    with its numbers (`loaded`: the float model of `source`, when already loaded).

    `on_checkpoint` receives resumable states (after synthesis, then during fine-tuning);
    `resume` continues from one, which must come from the same configuration. `synthetic`:
    (images, labels, where from) made before, used instead of a synthesis."""
    synthesis = None
    if resume is not None and resume.synthesis is not None:
        saved = resume.synthesis
        synthesis = Synthesis(saved["images"], saved["labels"], SynthesisReport.from_json(json.loads(saved["report"])), 0.0)
    loaded = loaded or load_float(source)
    check_trainable(loaded, config)
    inputs = load_inputs(source, device, loaded)
    if synthesis is None and synthetic is not None:
        synthesis = synthesis_from(inputs, *synthetic, device=device)
    return quantize_inputs(inputs, config, on_event, on_checkpoint, resume, synthesis, device)


def quantize_inputs(
    inputs: Inputs,
    config: RunConfig,
    on_event: EventHandler | None = None,
    on_checkpoint: ResumeHandler | None = None,
    resume: ResumeState | None = None,
    synthesis: Synthesis | None = None,
    device: torch.device = CPU,
) -> QuantizeResult:
    """`quantize` on loaded inputs; a given `synthesis` is used instead of training a
    generator (benchmarks share one across recipes and bit widths)."""
    with placed(inputs.float_model, device):
        result = _quantize(inputs, config, on_event, on_checkpoint, resume, synthesis, device)
    place(result.model, CPU)
    return result


def _quantize(
    inputs: Inputs,
    config: RunConfig,
    on_event: EventHandler | None,
    on_checkpoint: ResumeHandler | None,
    resume: ResumeState | None,
    synthesis: Synthesis | None,
    device: torch.device,
) -> QuantizeResult:
    require_calibration(inputs)  # activation ranges and every measurement need real images
    ranks = current()  # the processes of a torchrun job (one without): they share synthesis, training and evaluation
    config, synthesis_why = _run_config(inputs, config, synthesis)
    config_json = json.dumps(config.to_json(), sort_keys=True)  # the budget, not the plan searched for it
    fingerprint = inputs.fingerprint() if resume is not None or on_checkpoint is not None else None
    if resume is not None:
        _check_resume(resume, config_json, fingerprint)
    timings = {"load": inputs.seconds}

    trains = config.finetune.steps > 0 or config.reconstruct.iterations > 0
    needs_synthesis = config.synth.num_images > 0 and (trains or not config.real_images)
    if synthesis is None and needs_synthesis:
        synthesizing = None if on_checkpoint is None else lambda state: on_checkpoint(
            ResumeState(config_json, fingerprint, synthesizing=state))
        synthesis = synthesize(inputs, config.synth, on_event, config.real_images, device, synthesizing,
                               None if resume is None else resume.synthesizing, ranks)
        timings["synthesize"] = synthesis.seconds
    precision = None
    if config.budget is not None:  # the plan, then the run on it (a resumed run searches again: the states
        start = time.perf_counter()  # after the search record its plan, and another one is refused)
        precision = search_plan(inputs, config.quant, config.budget, config.calibration, on_event, device,
                                None if synthesis is None or not config.real_images else synthesis.images)
        searched = None if resume is None else resume.plan
        if searched is not None and searched != precision.overrides:  # a state saved for another plan
            raise ConfigError("the bit search chose another plan than the interrupted run's (on another device, or "
                              "other synthetic images): start the run again")
        config = replace(config, quant=replace(config.quant, layers=config.quant.layers + precision.overrides))
        timings["bit search"] = time.perf_counter() - start
    start = time.perf_counter()
    plan = resolve_layer_plan(inputs.capture, config.quant)
    model = place(prepare(inputs.float_model, inputs.capture, plan, inputs.info.output), device)  # new quantizer parameters start on the CPU
    calibrate(model, (inputs.calib if config.real_images else synthesis).images, config.calibration, on_event=on_event)
    timings["calibrate"] = time.perf_counter() - start
    saved_synthesis = None if synthesis is None else {
        "images": synthesis.images, "labels": synthesis.labels, "report": json.dumps(synthesis.report.to_json()),
    }

    def checkpoint(reconstruct_state: dict | None = None, finetune_state: dict | None = None) -> None:
        if on_checkpoint is not None:
            on_checkpoint(ResumeState(config_json, fingerprint, saved_synthesis, None, reconstruct_state, finetune_state,
                                      None if precision is None else precision.overrides))

    reconstructed, tuned, trained = _train(model, inputs, config, synthesis, resume, checkpoint, on_event, ranks)
    timings.update(trained)
    start = time.perf_counter()
    deployed, sqnr, float_top1 = _evaluate(model, inputs, ranks, on_event)
    timings["evaluate"] = time.perf_counter() - start
    return QuantizeResult(deployed, inputs, plan, synthesis, tuned, float_top1, timings, sqnr, reconstructed,
                          synthesis_why, config, precision)


def _train(model: QuantizedModel, inputs: Inputs, config: RunConfig, synthesis: Synthesis | None,
           resume: ResumeState | None, checkpoint: Callable[..., None], on_event: EventHandler | None, ranks: Ranks,
           ) -> tuple[ReconstructResult | None, FinetuneResult, dict[str, float]]:
    """The recipe's training of the calibrated `model`: block reconstruction (unless the state
    resumed from is already fine-tuning), then fine-tuning, on the real images (data-free: the
    synthetic ones take their place) and the synthetic ones; each hands its resumable states to
    `checkpoint`. Their results and timings."""
    real = (inputs.calib.images, inputs.calib.labels)
    synthetic = None if synthesis is None else (synthesis.images, synthesis.labels)
    if not config.real_images:
        real, synthetic = synthetic, None
    reconstructed, timings = None, {}
    finetune_resume = None if resume is None else resume.finetune
    if config.reconstruct.iterations > 0 and finetune_resume is None:
        start = time.perf_counter()
        train_idx, _ = split_holdout(real[1], config.finetune.holdout, config.finetune.seed)  # the held-out images stay unseen
        pool = view_pool(real[0][train_idx], None if synthetic is None else synthetic[0], config.reconstruct)
        reconstructed = reconstruct(
            model, inputs.float_model, pool, config.reconstruct, on_event,
            lambda state: checkpoint(reconstruct_state=state), None if resume is None else resume.reconstruct,
        )
        timings["reconstruct"] = time.perf_counter() - start
    start = time.perf_counter()
    tuned = finetune(
        model, inputs.teacher, real, config.finetune, synthetic, on_event,
        lambda state: checkpoint(finetune_state=state), finetune_resume, ranks,
    )
    timings["finetune"] = time.perf_counter() - start
    return reconstructed, tuned, timings


def _run_config(inputs: Inputs, config: RunConfig, synthesis: Synthesis | None) -> tuple[RunConfig, str]:
    """The run's configuration once it has seen its images, and why it synthesizes or not
    (`recipes.synthesis_choice`; images handed in are used whatever the choice). An impossible
    budget is refused here, before any work."""
    covered = len(inputs.calib.labels.unique())
    config, synthesis_why = synthesis_choice(config, len(inputs.calib) / covered, covered, inputs.num_classes)
    if synthesis is not None and (synthesis.report.method == "file" or not config.synth.num_images):
        # images handed in (a file, a benchmark's shared synthesis)
        config = replace(config, synth=replace(config.synth, num_images=len(synthesis.labels)))
        synthesis_why = f"{len(synthesis.labels)} synthetic images, given ({synthesis.report.source or 'by the caller'})"
    if config.budget is not None:
        check_budget(inputs.float_model, inputs.capture, config.quant, config.budget, inputs.calib.labels)
    return config, synthesis_why


def _check_resume(resume: ResumeState, config_json: str, fingerprint: str | None) -> None:
    """Refuse a state made with other options or from other inputs than this run's."""
    if resume.config != config_json:
        raise ConfigError("the state to resume was made with other options: resume with the same options, or start "
                          "the run again")
    if resume.inputs != fingerprint:
        raise ConfigError("the state to resume was made from another model file or other calibration images: resume "
                          "with the same ones, or start the run again")


def _evaluate(model: QuantizedModel, inputs: Inputs, ranks: Ranks, on_event: EventHandler | None,
              ) -> tuple[QuantizedModel, dict[str, float], float | None]:
    """The deployed form of the trained `model` (BatchNorms folded: what is exported and
    evaluated, in eval mode), each layer's SQNR (before folding, every layer's own output, on
    up to SQNR_IMAGES of val, else calib), and the float model's top-1 on val (None without
    val). The deployed model's own top-1 comes with its verification against the exported
    graph (`exporters.verify`: `torch_top1`), which runs it on the same images."""
    float_top1 = None
    emit(on_event, "evaluate", 0, 1)
    sqnr = layer_sqnr(model, (inputs.val or inputs.calib).images[:SQNR_IMAGES], ranks=ranks)
    deployed = fold_batch_norms(model)
    if inputs.val is not None:
        float_top1 = top1(predict(inputs.teacher, inputs.val.images, ranks=ranks), inputs.val.labels)
    emit(on_event, "evaluate", 1, 1)
    return deployed.eval(), sqnr, float_top1

