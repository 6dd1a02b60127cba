"""Block-wise reconstruction of the fake-quant model (BRECQ, with QDrop's random dropping of
activation quantization), unit by unit in the order they run (`quant.units`).

For each unit, the images of a fixed pool are run through the quantized model (the units
before it already reconstructed) to cache the unit's input, and through the float model to
cache the float unit's output. Where the model chains two units (the output tensor of one is
the input of the next, as in a Sequential), the next unit's inputs are the reconstructed
unit's outputs on its cached inputs, and its float inputs are the float outputs just cached:
each image then runs through each unit once, not through every unit before it. The unit is
then replayed alone on batches of the cached inputs (a batch holds at most `batch_elements`
elements of the unit's quantized activations: fewer images for a unit that works at a high
resolution, each of which brings more positions to the loss) and trained to reproduce the
float output (squared error summed over channels):
- each weight's rounding, up or down (AdaRound: a soft rounding variable per weight, pushed
  to 0 or 1 by a regulariser whose exponent falls from 20 to 2), at fixed weight step sizes;
- the step sizes of the unit's activation quantizers (LSQ); weight steps stay as calibrated
  (learning them too, as Genie does, measured no better on the bundled MobileNet);
- the bias shift of each of its layers (`QuantLayer.bias_shift`, set by calibration):
  rounding moves a layer's mean output, and the unit learns to put it back;
- each activation element skips its quantizer with probability `drop` while training (masks
  from a bank of random draws: `_MaskBank`).
The chosen roundings are then written into the student's weights: they sit on their grid
points, so the step sizes and round-to-nearest give back exactly those integers. A unit whose
error on the pool (as deployed: hard roundings, no dropping) is not lower than before keeps
what it had. A weight
that is computed in forward, or that several layers share, keeps round-to-nearest.

A resumable state is handed out after each unit."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from .config import ReconstructConfig
from .device import model_device
from .events import EventHandler, emit
from .finetune import views
from .quant.modules import ActivationQuantizer, QuantizedModel, QuantLayer, StopForward, forward_until_stopped
from .quant.units import Unit, find_units

CACHE_BATCH = 64
BETA_START, BETA_END = 20.0, 2.0


@dataclass(frozen=True)
class ReconstructResult:
    units: int
    layers: int  # quantized layers inside units
    rounded_layers: int  # of which with learned rounding
    pool: int  # images the units were trained on
    loss_before: float  # mean over units of each unit's error on the pool before and after
    loss_after: float
    seconds: float
    unit_losses: dict[str, tuple[float, float]]  # unit -> its error (before, after)
    unit_batches: dict[str, int]  # unit -> images per training batch (`batch_elements`)

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class _Rounding(nn.Module):
    """AdaRound's soft rounding of one weight: ``scale * clamp(floor(w / scale0) + h(v), qmin -
    zp, qmax - zp)`` with ``h(v) = clamp(1.2 sigmoid(v) - 0.1, 0, 1)``, `v` starting where the
    soft weight is `w`, the integer part fixed at the starting steps `scale0`, and `zp` the
    quantizer's zero points (per channel, shaped like `scale`)."""

    def __init__(self, weight: Tensor, scale: Tensor, zero_point: Tensor | float, qmin: int, qmax: int) -> None:
        super().__init__()
        self.register_buffer("low", torch.as_tensor(qmin - zero_point, dtype=weight.dtype))
        self.register_buffer("high", torch.as_tensor(qmax - zero_point, dtype=weight.dtype))
        scaled = weight.detach() / scale.detach()
        self.register_buffer("floor", scaled.floor())
        rest = (scaled - self.floor).clamp(0.0, 1.0)
        self.v = nn.Parameter(-torch.log(1.2 / (rest + 0.1) - 1))

    def h(self) -> Tensor:
        return (torch.sigmoid(self.v) * 1.2 - 0.1).clamp(0.0, 1.0)

    def forward(self, scale: Tensor) -> Tensor:
        return scale * torch.clamp(self.floor + self.h(), self.low, self.high)

    def hard(self, scale: Tensor) -> Tensor:
        return scale * torch.clamp(self.floor + (self.v >= 0).float(), self.low, self.high)

    def regulariser(self, beta: float) -> Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()


@torch.no_grad()
def _chained(model: nn.Module, run: Callable[[Tensor], object], modules: list[nn.Module], example: Tensor) -> list[bool]:
    """For each of `modules` (called once each by `run`, a forward of `model`, in this order):
    whether the tensor it receives is the one the module before it returned, unchanged (an
    in-place op between the two, such as `relu_`, keeps the tensor but not its values)."""
    received: list[object] = [None] * len(modules)
    returned: list[tuple[object, Tensor | None]] = [(None, None)] * len(modules)

    def hooks(index: int) -> tuple[Callable, Callable]:
        def pre(mod: nn.Module, args: tuple) -> None:
            received[index] = args[0] if args else None
            if isinstance(received[index], Tensor) and index > 0 and received[index] is returned[index - 1][0]:
                received[index] = torch.equal(received[index], returned[index - 1][1])

        def post(mod: nn.Module, args: tuple, out: object) -> None:
            returned[index] = (out, out.detach().clone() if isinstance(out, Tensor) else None)

        return pre, post

    handles = []
    for index, module in enumerate(modules):
        pre, post = hooks(index)
        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        run(example.to(model_device(model)))
    finally:
        for handle in handles:
            handle.remove()
    return [received[index] is True for index in range(len(modules))]


@torch.no_grad()
def _apply(run: Callable[[Tensor], Tensor], inputs: Tensor, device: torch.device) -> Tensor:
    """`run` on every cached input, in batches, kept on the inputs' device. Each batch is a
    copy: a unit that starts with an in-place op (`relu_`) must not change the cache."""
    return torch.cat([run(inputs[start : start + CACHE_BATCH].to(device, copy=True)).detach().to(inputs.device)
                      for start in range(0, len(inputs), CACHE_BATCH)])


@torch.no_grad()
def _unit_elements(student: QuantizedModel, module: nn.Module, example: Tensor) -> int:
    """The activation elements the unit's layers quantize for one image."""
    count = 0

    def tap(owner: QuantLayer | ActivationQuantizer, role: str, raw: Tensor, quantized: Tensor) -> Tensor:
        nonlocal count
        count += raw.numel() if role == "y" or (role == "x" and not owner.tied) else 0
        return quantized

    student.tap = tap
    try:
        student.run_module(module, example[:1].to(model_device(student)))
    finally:
        student.tap = None
    return count


@torch.no_grad()
def _cache(model: nn.Module, run: Callable[[Tensor], object], module: nn.Module, pool: Tensor, side: str) -> Tensor:
    """The unit's input (`side` "input") or output ("output") for every image of `pool`,
    running `run` (a forward of `model`) only as far as the unit."""
    parts: list[Tensor] = []

    def pre(mod: nn.Module, args: tuple) -> None:
        if side == "input":
            parts.append(args[0].detach().clone())
            raise StopForward

    def post(mod: nn.Module, args: tuple, out: Tensor) -> None:
        parts.append(out.detach().clone())
        raise StopForward

    handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        forward_until_stopped(run, pool, CACHE_BATCH, model_device(model))
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(parts)


def _reconstruction_loss(out: Tensor, target: Tensor) -> Tensor:
    """Squared error summed over channels (dimension 1), averaged over everything else."""
    error = (out - target).square()
    return error.sum(1).mean() if error.dim() > 1 else error.mean()


def _error(outputs: Tensor, targets: Tensor) -> float:
    """The reconstruction loss over the whole pool."""
    return sum(_reconstruction_loss(outputs[start : start + CACHE_BATCH], targets[start : start + CACHE_BATCH]).item()
               * len(outputs[start : start + CACHE_BATCH]) for start in range(0, len(outputs), CACHE_BATCH)) / len(outputs)


def _beta(progress: float, warmup: float) -> float | None:
    """The regulariser's exponent at `progress` (0..1) of a unit's iterations; None while warming up."""
    if progress < warmup:
        return None
    return BETA_END + (BETA_START - BETA_END) * max(0.0, 1 - (progress - warmup) / (1 - warmup))


def _roundable(student: QuantizedModel, names: tuple[str, ...]) -> dict[str, nn.Parameter]:
    """The unit's layers whose weight is a parameter of their own, by layer name."""
    layers = {layer.name: layer for layer in student.capture.layers}
    owners: dict[str, int] = {}
    for quant in student.layers:
        weight = layers[quant.name].weight
        if weight is not None:
            owners[weight] = owners.get(weight, 0) + 1
    return {name: student.model.get_parameter(layers[name].weight) for name in names
            if layers[name].weight is not None and owners[layers[name].weight] == 1 and layers[name].calls == 1}


def reconstruct(
    student: QuantizedModel,
    float_model: nn.Module,
    pool: Tensor,
    config: ReconstructConfig,
    on_event: EventHandler | None = None,
    on_checkpoint: Callable[[dict], None] | None = None,
    resume: dict | None = None,
) -> ReconstructResult:
    """Reconstruct `student` (calibrated) unit by unit against `float_model` (the float module
    tree `student` was prepared from) on the images of `pool` (see the module doc)."""
    start = time.perf_counter()
    units = find_units(student)
    quant = {layer.name: layer for layer in student.layers}
    float_modules = dict(float_model.named_modules())
    total = len(units) * config.iterations
    first_unit = 0
    unit_losses: dict[str, tuple[float, float]] = {}
    unit_batches: dict[str, int] = {}
    if resume is not None:
        student.load_state_dict(resume["student"])
        first_unit = resume["units"]
        unit_losses = dict(resume["unit_losses"])
        unit_batches = dict(resume.get("unit_batches", {}))  # saved before batches were sized
    student.eval()
    float_model.eval()
    device = model_device(student)
    modules = [student.model.get_submodule(unit.module) for unit in units]
    float_units = [float_modules[unit.module] for unit in units]
    chained = _chained(student, student.forward_all, modules, pool[:1])
    float_chained = _chained(float_model, float_model, float_units, pool[:1])
    emit(on_event, "reconstruct", first_unit * config.iterations, total)
    rounded = 0
    outputs = float_outputs = None  # of the unit before, once reconstructed
    for index, (unit, module, float_unit) in enumerate(zip(units, modules, float_units)):
        roundable = _roundable(student, unit.layers)
        rounded += len(roundable)
        if index < first_unit:
            continue
        inputs = outputs if chained[index] and outputs is not None else _cache(student, student.forward_all, module, pool, "input")
        float_inputs = (float_outputs if float_chained[index] and float_outputs is not None
                        else _cache(float_model, float_model, float_unit, pool, "input"))
        targets = _apply(float_unit, float_inputs, device)
        del float_inputs
        before, after, outputs, batch = _reconstruct_unit(
            student, module, [quant[name] for name in unit.layers], unit, roundable, inputs, targets, config,
            config.seed * 100_003 + index,
            lambda step, loss, index=index: emit(on_event, "reconstruct", index * config.iterations + step, total,
                                                 loss=loss, unit=index + 1),
        )
        float_outputs = targets
        unit_losses[unit.module] = (before, after)
        unit_batches[unit.module] = batch
        if on_checkpoint is not None and index + 1 < len(units):
            on_checkpoint(copy.deepcopy({"units": index + 1, "student": student.state_dict(),
                                         "unit_losses": unit_losses, "unit_batches": unit_batches}))
    emit(on_event, "reconstruct", total, total)
    befores = [before for before, _ in unit_losses.values()]
    afters = [after for _, after in unit_losses.values()]
    return ReconstructResult(
        len(units), sum(len(unit.layers) for unit in units), rounded, len(pool),
        sum(befores) / len(befores) if befores else math.nan, sum(afters) / len(afters) if afters else math.nan,
        time.perf_counter() - start, unit_losses, unit_batches,
    )


def _reconstruct_unit(student: QuantizedModel, module: nn.Module, layers: list[QuantLayer], unit: Unit,
                      roundable: dict[str, nn.Parameter], inputs: Tensor, targets: Tensor, config: ReconstructConfig,
                      seed: int, on_step: Callable[[int, float], None]) -> tuple[float, float, Tensor, int]:
    """Train one unit (`module`, its quantized `layers`) on its cached `inputs` towards the float
    `targets`, and keep what it learned only when its error as deployed drops: (error before,
    error after, its outputs as kept, the batch size it trained with)."""
    device = model_device(student)

    def deployed() -> Tensor:  # the unit's outputs as it is now
        return _apply(lambda x: student.run_module(module, x), inputs, device)

    before = _error(deployed(), targets)
    quantizers = _unit_quantizers(student, unit, layers)
    saved = _unit_state(layers, quantizers, roundable)
    batch = max(1, min(config.batch_size, config.batch_elements // max(1, _unit_elements(student, module, inputs))))
    _train_unit(student, module, layers, quantizers, roundable, inputs, targets, replace(config, batch_size=batch),
                torch.Generator().manual_seed(seed), on_step)
    outputs = deployed()
    after = _error(outputs, targets)
    if after >= before:
        _restore(saved)
        after = before
        outputs = deployed()
    return before, after, outputs, batch


def _unit_quantizers(student: QuantizedModel, unit: Unit, layers: list[QuantLayer]) -> list[ActivationQuantizer]:
    """The activation quantizers a unit's replay applies: its layers' own input quantizers and
    the sites computed inside its module (a tied layer reads a site of the unit before)."""
    inside = {site.name for site in student.capture.sites
              if not unit.module or site.module == unit.module or site.module.startswith(unit.module + ".")}
    found = {id(layer.input_quant): layer.input_quant for layer in layers if not layer.tied}
    found.update((id(site), site) for site in student.sites if site.name in inside)
    return list(found.values())


def _unit_state(layers: list[QuantLayer], quantizers: list[ActivationQuantizer],
                roundable: dict[str, nn.Parameter]) -> list[tuple[Tensor, Tensor]]:
    """(tensor, a copy of its value) for what training a unit changes."""
    tensors = [*roundable.values(), *(quant.log_scale for quant in quantizers)]
    tensors += [layer.bias_shift for layer in layers if layer.bias_shift is not None]
    return [(t, t.detach().clone()) for t in tensors]


@torch.no_grad()
def _restore(saved: list[tuple[Tensor, Tensor]]) -> None:
    for tensor, value in saved:
        tensor.copy_(value)


class _MaskBank:
    """QDrop's masks: 1 (skip the quantizer) with probability `drop`, else 0, drawn per element.
    Drawing fresh random numbers for every activation element at every step costs several
    times the step itself on a CPU; a mask is instead a window, at a random offset, of a bank
    of random draws twice as long as the largest tensor seen, made once per unit."""

    def __init__(self, drop: float, generator: torch.Generator) -> None:
        self.drop = drop
        self.generator = generator
        self.bank: Tensor | None = None

    def draw(self, like: Tensor) -> Tensor:
        size = like.numel()
        if self.bank is None or len(self.bank) < 2 * size:
            self.bank = (torch.rand(2 * size, generator=self.generator, device=like.device) < self.drop).to(like.dtype)
        offset = int(torch.randint(len(self.bank) - size + 1, (1,), generator=self.generator, device=like.device))
        return self.bank[offset : offset + size].view(like.shape)


def _train_unit(
    student: QuantizedModel,
    module: nn.Module,
    layers: list[QuantLayer],
    quantizers: list[ActivationQuantizer],
    roundable: dict[str, nn.Parameter],
    inputs: Tensor,
    targets: Tensor,
    config: ReconstructConfig,
    generator: torch.Generator,
    progress: Callable[[int, float], None],
) -> None:
    """Train one unit and write the learned roundings into its weights."""
    device = model_device(student)
    by_name = {layer.name: layer for layer in layers}

    def weight_scale(name: str) -> Tensor:
        quant = by_name[name].weight_quant
        return quant.scale().reshape(quant.channel_shape(roundable[name]))

    roundings = {}
    for name, weight in roundable.items():
        quant = by_name[name].weight_quant
        roundings[name] = _Rounding(weight, weight_scale(name), quant.channel_zero_point(weight), *quant.range()).to(device)
    scales = [quant.log_scale for quant in quantizers if quant.enabled]
    shifts = [layer.bias_shift.requires_grad_(True) for layer in layers if config.bias_lr > 0 and layer.bias_shift is not None]
    groups = [{"params": [r.v for r in roundings.values()], "lr": config.rounding_lr}]
    if scales:
        groups.append({"params": scales, "lr": config.scale_lr})
    if shifts:
        groups.append({"params": shifts, "lr": config.bias_lr})
    optimizer = torch.optim.Adam(groups)
    frozen = [p for p in student.parameters() if p.requires_grad and all(p is not s for s in scales)]
    for parameter in frozen:
        parameter.requires_grad_(False)
    masks = _MaskBank(config.drop, torch.Generator(device=device).manual_seed(int(torch.randint(2**31, (1,), generator=generator))))

    def tap(owner: QuantLayer | ActivationQuantizer, role: str, raw: Tensor, quantized: Tensor) -> Tensor:
        if role == "w" and owner.name in roundings:
            return roundings[owner.name](weight_scale(owner.name))
        if role in ("x", "y") and config.drop > 0:
            return torch.lerp(quantized, raw, masks.draw(raw))  # the element's raw value where the mask is 1
        return quantized

    student.tap = tap
    try:
        for step in range(1, config.iterations + 1):
            picked = torch.randint(len(inputs), (config.batch_size,), generator=generator)
            loss = _reconstruction_loss(student.run_module(module, inputs[picked].to(device)), targets[picked].to(device))
            beta = _beta((step - 1) / config.iterations, config.warmup)
            total = loss
            if beta is not None and roundings and config.round_weight > 0:
                total = loss + config.round_weight * sum(r.regulariser(beta) for r in roundings.values())
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            progress(step, loss.item())
    finally:
        student.tap = None
        for parameter in frozen:
            parameter.requires_grad_(True)
        for shift in shifts:
            shift.requires_grad_(False)
    with torch.no_grad():
        for name, rounding in roundings.items():
            roundable[name].copy_(rounding.hard(weight_scale(name)))


def view_pool(real: Tensor, synthetic: Tensor | None, config: ReconstructConfig) -> Tensor:
    """The images units are reconstructed on: `config.views` views of the real images (each
    image once as it is, the rest augmented: `finetune.augment`; every image once when there
    are more images than views) and up to `config.views` synthetic images chosen at random."""
    generator = torch.Generator().manual_seed(config.seed)
    pool = views(real, config.views, generator)
    if synthetic is None or not len(synthetic):
        return pool
    return torch.cat([pool, synthetic[torch.randperm(len(synthetic), generator=generator)[: config.views]]])
