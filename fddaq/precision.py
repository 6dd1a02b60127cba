"""Mixed precision under a budget: each layer's weight bits chosen from a few widths, for the
smallest model that keeps its accuracy (`target_drop`) or the most accurate one that fits a
size (`target_size`).

- **Size** (`SizeModel`): what the exported graph stores for each layer at each width (packed
  INT4 or INT8 weights, per-channel scales and zero points, an INT32 bias with its scales)
  against the float graph (float32 weights, BatchNorms folded into their convs), from the
  parameter counts alone: a budget no plan can meet is refused before any work.
- **Held out** (`held_out`): a share of each class's calibration images (of all of them with
  one image per class) calibrates nothing in the search; plans are measured on `HELD_VIEWS`
  views of them (each once as it is, the rest shifted and flipped), for a finer agreement.
- **Sensitivity** (`weight_sensitivity`): for each searched layer and width, the output
  divergence from float when only that layer's weights are quantized at that width, with the
  bias shift that removes their rounding's mean error (ZeroQ's measure, `fddaq.sensitivity`,
  after a first-order bias correction: what a recipe's correction leaves), on the first
  `SENSITIVITY_VIEWS` of those views, averaged with the same on as many synthetic images when
  the run synthesizes some (the search then runs after the synthesis).
- **Search** (`pareto_walk`): from every layer at the widest choice, lower one layer a step at
  a time, each time the one that adds the least divergence per byte saved. The walk gives
  nested plans from the largest to the smallest, the size-vs-divergence curve. Per-layer
  divergences do not add up (errors compound, and cancel), so the summed prediction only
  orders the plans; `choose` then measures whole plans on the held-out images (`Widths`),
  bisecting the curve for the smallest plan within the accepted drop. An exact knapsack optimum of a
  prediction that is itself approximate would buy little, and nested plans make that
  bisection monotone in size.
- **Cost** (`Widths`): the model is calibrated once, at the widest width; a narrower width adds
  only its weight quantizers and their bias shifts. A layer's sensitivity (every other value
  float, so nothing else is computed) and a whole plan are then one forward each with the right
  weights swapped in: no plan is calibrated again.
- Activation bits are not searched: they do not change the file's size, and the widest
  (8-bit) activations are what integer kernels run. Layers a user fixed (`--layer-bits`, first
  and last at `--first-last-bits`) keep their bits; the rest are searched.

The chosen plan is a list of layer overrides (`overrides`), which reproduce it without a search
when given back as `QuantConfig.layers`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
from torch import Tensor, nn

from .config import BudgetConfig, CalibrationConfig, QuantConfig
from .device import model_device, place
from .errors import ConfigError, ModelError
from .events import EventHandler, emit
from .finetune import split_holdout, views
from .quant.bias import rounding_shifts
from .quant.calibrate import calibrate
from .quant.capture import Capture
from .quant.modules import Selected, WeightQuantizer, switched_off
from .quant.plan import LayerPlan, resolve_layer_plan, weight_grid
from .quant.prepare import prepare
from .sensitivity import Divergence, Measure

# What a quantized layer and a quantized tensor between operators add to the graph besides
# their numbers (nodes, tensor names, scalars), fitted on the bundled models, EfficientNet-Lite0,
# ResNet-18 and MobileNetV3-Large at W4A4/W8A8/W4A8, both tensor sets (within 1.5% of the file)
GRAPH_BYTES_PER_LAYER = 350
GRAPH_BYTES_PER_NAME_CHAR = 32  # a layer's name appears in about 30 of the graph's names and nodes
GRAPH_BYTES_PER_SITE = 160
GRAPH_BYTES_PER_CLAMP = 100  # the Max clamping an input below 8 bits to its grid
FLOAT_GRAPH_BYTES_PER_LAYER = 190  # a float layer's node and names
FLOAT_BYTES = 4
HELD_VIEWS = 256  # views of the held-out images plans are measured on: each once, the rest augmented
SENSITIVITY_VIEWS = 16  # of those, the ones each layer's sensitivity is measured on (a forward per layer and
# width: most of the search's time)
CURVE_POINTS = 5  # plans of the curve measured for the report, evenly spaced (besides those the choice measured)


@dataclass(frozen=True)
class LayerSize:
    kind: str
    weights: int  # number of weight values
    channels: int
    bias: bool  # a bias in the graph: its own, or a folded BatchNorm's

    def bytes(self, bits: int | None, grid: str = "symmetric") -> float:
        """What the graph stores for this layer with `bits`-bit weights (None: float) on the
        weight grid `grid` ("affine" or "symmetric")."""
        if bits is None:
            return FLOAT_BYTES * (self.weights + (self.channels if self.bias else 0))
        width = 0.5 if bits <= 4 else 1.0  # INT4 packs two values in a byte; 5..8 bits are INT8
        size = self.weights * width + FLOAT_BYTES * self.channels  # integers and per-channel scales
        if grid == "affine":
            size += self.channels * width  # per-channel zero points
        elif self.kind == "linear" and bits > 4:
            size += self.channels  # the zero point a QGemm needs
        if self.bias:
            size += 2 * FLOAT_BYTES * self.channels  # INT32 bias and its per-channel scale
        return size


@dataclass(frozen=True)
class SizeModel:
    """The graph's size from parameter counts: `layers` by name, `other_bytes`, what no
    layer's bits change (parameters outside the layers, stored float), and the number of
    tensors between operators a fully quantized graph quantizes."""

    layers: dict[str, LayerSize]
    other_bytes: float
    sites: int = 0

    @classmethod
    def of(cls, model: nn.Module, capture: Capture) -> SizeModel:
        parameters = dict(model.named_parameters())
        folded = {fold.layer: fold for fold in capture.folds}
        used: set[str] = set()
        layers = {}
        for layer in capture.layers:
            names = [layer.weight] if layer.weight is not None else list(layer.sources)
            weights = sum(parameters[name].numel() for name in names if name in parameters)
            layers[layer.name] = LayerSize(layer.kind, weights, layer.channels, layer.bias is not None or layer.name in folded)
            used.update(names)
            used.update(name for name in (layer.bias,) if name is not None)
        for fold in capture.folds:
            used.update(name for name in (fold.weight, fold.bias) if name is not None)
        other = sum(p.numel() for name, p in parameters.items() if name not in used)
        return cls(layers, float(FLOAT_BYTES * other), len(capture.sites))

    def float_bytes(self) -> float:
        return self.other_bytes + sum(size.bytes(None) + FLOAT_GRAPH_BYTES_PER_LAYER for size in self.layers.values())

    def plan_bytes(self, plan: LayerPlan) -> float:
        """The size of `plan`'s graph (a layer it does not list, or keeps float, is float)."""
        bits = {entry.name: entry for entry in plan.quantized}
        graph = sum(GRAPH_BYTES_PER_LAYER + GRAPH_BYTES_PER_NAME_CHAR * len(name)
                    + (GRAPH_BYTES_PER_CLAMP if (entry.act_bits or 8) < 8 else 0) for name, entry in bits.items())
        graph += GRAPH_BYTES_PER_SITE * self.sites if plan.tensor_bits is not None else 0
        return self.other_bytes + graph + sum(
            size.bytes(bits[name].weight_bits, bits[name].weight_grid) if name in bits
            else size.bytes(None) + FLOAT_GRAPH_BYTES_PER_LAYER for name, size in self.layers.items())


@dataclass(frozen=True)
class Point:
    """A plan of the search: weight bits of the searched layers, its size against float and
    the summed per-layer divergence it predicts; `drop` and `kl`, once measured."""

    bits: dict[str, int]
    ratio: float
    predicted_kl: float
    drop: float | None = None  # points of top-1 agreement with float lost on the held-out images
    kl: float | None = None


@dataclass(frozen=True)
class MixedPrecision:
    """The search's outcome: the `chosen` plan (None when no plan could be measured), whether
    it meets the budget (`met`; else it is the closest plan), the curve (`points`, largest
    first, measured ones with their drop), every searched layer's divergence per width, and
    the overrides that reproduce the choice."""

    budget: BudgetConfig
    searched: tuple[str, ...]
    sensitivity: dict[str, dict[int, float]]  # layer -> bits -> KL from float, that layer alone
    points: tuple[Point, ...]
    chosen: Point
    met: bool
    overrides: tuple[str, ...]
    held_out: int  # calibration images held out
    views: int  # views of them the plans are measured on
    uniform: dict[str, Point]  # "W4A8", "W8A8", ...: every searched layer at one width, measured; "W4A4":
    # activations at the narrowest width too (when narrower than the plan's)

    def to_json(self) -> dict:
        return {**asdict(self), "sensitivity": {layer: {str(b): kl for b, kl in by_bits.items()}
                                                for layer, by_bits in self.sensitivity.items()}}


def searched_layers(plan: LayerPlan) -> tuple[str, ...]:
    """The quantized layers whose weight bits the search chooses: those at the default bits (the
    first layer's input bits are the image's), not those a user fixed."""
    return tuple(entry.name for entry in plan.quantized
                 if "override" not in entry.reason and "first_last_bits" not in entry.reason)


def check_budget(model: nn.Module, capture: Capture, quant: QuantConfig, budget: BudgetConfig,
                 labels: Tensor | None = None) -> None:
    """Refuse, before any work (from parameter counts), a budget no plan can meet: no layer
    left to search, or a size below that of every searched layer at the narrowest choice; and,
    given the calibration images' `labels`, too few images to hold some out."""
    if labels is not None:
        held_out(labels, budget.holdout, 0)
    sizes, plan, grid = SizeModel.of(model, capture), resolve_layer_plan(capture, quant), quant.weight_grid
    searched = searched_layers(plan)
    if not searched:
        raise ConfigError("no layer is left for the bit search: every quantized layer has bits fixed by an override")
    if budget.target_size is not None:
        narrowest = min(budget.bit_choices)
        smallest = _ratio(sizes, plan, dict.fromkeys(searched, narrowest), grid)
        if budget.target_size < smallest:
            raise ConfigError(f"target size {budget.target_size:g} is below the smallest model the bit choices "
                              f"{','.join(map(str, budget.bit_choices))} allow: {smallest:.3f}x float (every searched "
                              f"layer at {narrowest} bits)")


def _ratio(sizes: SizeModel, plan: LayerPlan, bits: dict[str, int], grid: str) -> float:
    return sizes.plan_bytes(with_bits(plan, bits, grid)) / sizes.float_bytes()


def with_bits(plan: LayerPlan, bits: dict[str, int], grid: str) -> LayerPlan:
    """`plan` with the weight bits of the layers in `bits`, on the grid `grid`
    (`QuantConfig.weight_grid`) gives them."""
    return replace(plan, layers=tuple(
        replace(entry, weight_bits=bits[entry.name], weight_grid=weight_grid(bits[entry.name], grid))
        if entry.name in bits else entry for entry in plan.layers))


def overrides(plan: LayerPlan, bits: dict[str, int]) -> tuple[str, ...]:
    """`--layer-bits` entries giving each layer in `bits` its weight bits and its planned input
    bits: with them a run plans what the search chose."""
    entries = {entry.name: entry for entry in plan.quantized}
    return tuple(f"{name}={bits[name]}/{entries[name].act_bits}" for name in entries if name in bits)


class Widths:
    """The model quantized at each width of the search: `base`, every searched layer at the
    widest width, calibrated; and each searched layer's weight quantizer at every narrower
    width; every width with the bias shift that removes the mean output error of its rounding
    alone (`rounding_shifts`: to first order, what a recipe's bias correction does).
    A plan is measured as `base` with those quantizers and shifts swapped in for its narrower
    layers: one forward, no calibration per plan. The activation ranges stay those of the
    widest plan (a plan's own calibration moves them little at 8 bits)."""

    def __init__(self, model: nn.Module, capture: Capture, output: str, plan: LayerPlan, grid: str,
                 choices: tuple[int, ...], searched: tuple[str, ...], images: Tensor,
                 calibration: CalibrationConfig) -> None:
        widest = max(choices)
        device = model_device(model)  # new quantizers start on the CPU
        self.base = place(prepare(model, capture, with_bits(plan, dict.fromkeys(searched, widest), grid), output), device)
        calibrate(self.base, images, replace(calibration, bias_images=0))
        weights = self.base.layer_weights()
        quantizers: dict[str, list[WeightQuantizer]] = {}  # each searched layer's, narrowest first
        for layer in self.base.layers:
            if layer.name in searched:
                quantizers[layer.name] = []
                for bits in choices[:-1]:
                    quantizer = WeightQuantizer(bits, layer.weight_quant.log_scale.numel(), layer.weight_quant.axis,
                                                weight_grid(bits, grid) == "affine").to(device)
                    quantizer.set_mse(weights[layer.name])
                    quantizers[layer.name].append(quantizer)
                quantizers[layer.name].append(layer.weight_quant)
        shifts = rounding_shifts(self.base, quantizers, images)
        never = [name for name in quantizers if name not in shifts]
        if never:
            raise ModelError(f"the quantized model never called {', '.join(never[:4])}: the model's forward differs "
                             "from the one fddaq captured")
        # layer -> bits -> (weight quantizer, bias shift); the base starts at the widest
        self.widths: dict[str, dict[int, tuple[WeightQuantizer, Tensor]]] = {
            name: dict(zip(choices, zip(found, shifts[name]))) for name, found in quantizers.items()}
        self._restore()

    def _restore(self) -> None:
        for layer in self.base.layers:
            if layer.name in self.widths:
                layer.weight_quant, layer.bias_shift = self.widths[layer.name][max(self.widths[layer.name])]

    def measure(self, measure: Measure, bits: dict[str, int], alone: bool = False) -> Divergence:
        """`measure` of `base` with each layer of `bits` at its width (its weight quantizer
        swapped in); `alone`, with every other value float (one layer's sensitivity)."""
        # alone: every other layer and every activation quantizer off (not computed and then
        # discarded: this is most of the search's forwards)
        off = [*(layer for layer in self.base.layers if layer.name not in bits),
               *self.base.activation_quantizers().values()] if alone else []
        try:
            for layer in self.base.layers:
                if layer.name in bits:
                    layer.weight_quant, layer.bias_shift = self.widths[layer.name][bits[layer.name]]
            with switched_off(off):
                return measure(self.base.eval())
        finally:
            self._restore()


def weight_sensitivity(widths: Widths, measure: Measure, on_event: EventHandler | None = None,
                       ) -> dict[str, dict[int, float]]:
    """KL from float of each searched layer's weights alone at each width, on the images of
    `measure` (the mean of the real and the synthetic images' KL when it has both)."""
    found: dict[str, dict[int, float]] = {name: {} for name in widths.widths}
    total = sum(map(len, widths.widths.values()))
    emit(on_event, "bit search", 0, total)  # the plans measured afterwards take a few more forwards
    for name, by_bits in widths.widths.items():
        for bits in sorted(by_bits):
            divergence = widths.measure(measure, {name: bits}, alone=True)
            found[name][bits] = divergence.kl if divergence.kl_synthetic is None else (
                (divergence.kl + divergence.kl_synthetic) / 2)
            emit(on_event, "bit search", sum(map(len, found.values())), total)
    return found


def pareto_walk(sensitivity: dict[str, dict[int, float]], sizes: SizeModel, plan: LayerPlan, grid: str) -> list[Point]:
    """Nested plans from every searched layer at its widest choice to every one at its
    narrowest, each one step narrower in the layer that adds the least divergence per byte
    saved (see the module doc)."""
    current = {name: max(by_bits) for name, by_bits in sensitivity.items()}

    def saved(name: str, bits: int, lower: int) -> float:
        size = sizes.layers[name]
        return size.bytes(bits, weight_grid(bits, grid)) - size.bytes(lower, weight_grid(lower, grid))

    def point() -> Point:
        return Point(dict(current), _ratio(sizes, plan, current, grid), sum(sensitivity[n][b] for n, b in current.items()))

    points = [point()]
    while True:
        best = None
        for name, bits in current.items():
            # the widest narrower width that saves bytes (5-7 bits are stored as INT8, 2-3 as INT4)
            lower = max((b for b in sensitivity[name] if b < bits and saved(name, bits, b) > 0), default=None)
            if lower is None:
                continue
            cost = max(sensitivity[name][lower] - sensitivity[name][bits], 0.0)
            key = (cost / saved(name, bits, lower), -saved(name, bits, lower))
            if best is None or key < best[0]:
                best = (key, name, lower)
        if best is None:
            return points
        current[best[1]] = best[2]
        points.append(point())


def held_out(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices (calibration, held out): `fraction` of each class with 2 images or more; when no
    class has 2 (one image per class), `fraction` of all the images, whatever their class
    (agreement with float needs no label)."""
    kept, held = split_holdout(labels, fraction, seed, smallest=2)
    if len(held):
        return kept, held
    if len(labels) < 2:
        raise ConfigError("the bit search measures plans on calibration images it holds out: give at least 2 images")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    count = max(1, round(fraction * len(labels)))
    return order[count:].sort().values, order[:count].sort().values


def choose(points: list[Point], measure: Callable[[Point], tuple[float, float]], target_size: float | None,
           target_drop: float | None) -> tuple[Point, bool, list[Point]]:
    """The plan of `points` (largest first) for the budget, measured with `measure` (point ->
    (drop, KL)), whether it meets the budget, and every point measured on the way.

    A size budget takes the largest plan that fits. A drop budget bisects the curve for the
    smallest plan measured within the drop; when even the largest plan is not, that plan is
    returned as the closest one."""
    measured: dict[int, Point] = {}

    def at(index: int) -> Point:
        if index not in measured:
            drop, kl = measure(points[index])
            measured[index] = replace(points[index], drop=drop, kl=kl)
        return measured[index]

    if target_size is not None:
        index = next((i for i, p in enumerate(points) if p.ratio <= target_size), len(points) - 1)
        chosen = at(index)
        return chosen, chosen.ratio <= target_size, [measured[i] for i in sorted(measured)]
    assert target_drop is not None
    if at(0).drop > target_drop:
        return measured[0], False, [measured[0]]
    good, bad = 0, len(points)  # points[good] is within the drop; past `bad` none is known to be
    if at(len(points) - 1).drop <= target_drop:
        good = len(points) - 1
    else:
        bad = len(points) - 1
        while bad - good > 1:
            middle = (good + bad) // 2
            if at(middle).drop <= target_drop:
                good = middle
            else:
                bad = middle
    return measured[good], True, [measured[i] for i in sorted(measured)]


def search(
    model: nn.Module, capture: Capture, output: str, quant: QuantConfig, budget: BudgetConfig, images: Tensor,
    labels: Tensor, seed: int = 0, synthetic: Tensor | None = None,
    calibration: CalibrationConfig = CalibrationConfig(), on_event: EventHandler | None = None,
) -> MixedPrecision:
    """Choose each searched layer's weight bits from `budget.bit_choices` for the budget (see
    the module doc): sensitivities and plans are measured on a `budget.holdout` share of the
    calibration `images` (per class, by `labels`), which calibrates nothing here; sensitivities
    on `SENSITIVITY_VIEWS` `synthetic` images too, when given."""
    check_budget(model, capture, quant, budget, labels)
    plan = resolve_layer_plan(capture, quant)
    sizes = SizeModel.of(model, capture)
    searched = searched_layers(plan)
    kept, held_index = held_out(labels, budget.holdout, seed)
    held = views(images[held_index], HELD_VIEWS, torch.Generator().manual_seed(seed))
    widths = Widths(model, capture, output, plan, quant.weight_grid, budget.bit_choices, searched, images[kept],
                    calibration)
    teacher = Selected(model, output)
    few = None if synthetic is None else synthetic[:SENSITIVITY_VIEWS]
    sensitivity = weight_sensitivity(widths, Measure(teacher, held[:SENSITIVITY_VIEWS], few), on_event)
    points = pareto_walk(sensitivity, sizes, plan, quant.weight_grid)
    on_held = Measure(teacher, held, None)  # the float model's outputs, once

    def measure(point: Point) -> tuple[float, float]:
        divergence = widths.measure(on_held, point.bits)
        return 100.0 - divergence.agreement, divergence.kl

    chosen, met, measured = choose(points, measure, budget.target_size, budget.target_drop)
    done = {tuple(sorted(p.bits.items())) for p in measured}
    for index in sorted({round(i * (len(points) - 1) / (CURVE_POINTS - 1)) for i in range(CURVE_POINTS)}):
        if tuple(sorted(points[index].bits.items())) not in done:  # the curve, for the report
            measured.append(replace(points[index], **dict(zip(("drop", "kl"), measure(points[index])))))
    uniform = {}
    for bits in budget.bit_choices:  # the widest and the narrowest are the curve's ends, measured
        setting = dict.fromkeys(searched, bits)
        drop, kl = next(((m.drop, m.kl) for m in measured if m.bits == setting), None) or measure(Point(setting, 0, 0))
        uniform[f"W{bits}A{quant.act_bits}"] = Point(setting, _ratio(sizes, plan, setting, quant.weight_grid),
                                                     sum(sensitivity[n][bits] for n in searched), drop, kl)
    narrowest = min(budget.bit_choices)
    if narrowest < quant.act_bits:  # every layer's weights and activations at the narrowest width, as
        # `--bits` plans it: calibrated for itself (the curve's has wider activations), measured as the curve's plans
        low = resolve_layer_plan(capture, replace(quant, weight_bits=narrowest, act_bits=narrowest))
        divergence = Widths(model, capture, output, low, quant.weight_grid, (narrowest,), searched, images[kept],
                            calibration).measure(on_held, {})
        uniform[f"W{narrowest}A{narrowest}"] = Point(
            dict.fromkeys(searched, narrowest), sizes.plan_bytes(low) / sizes.float_bytes(),
            sum(sensitivity[n][narrowest] for n in searched), 100.0 - divergence.agreement, divergence.kl)
    curve = tuple(next((m for m in measured if m.bits == p.bits), p) for p in points)
    return MixedPrecision(budget, searched, sensitivity, curve, chosen, met, overrides(plan, chosen.bits),
                          len(held_index), len(held), uniform)
