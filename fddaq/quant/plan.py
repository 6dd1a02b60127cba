"""Which layers are quantized, at which bits, and why: a pure function of what the model
computes (`capture.Capture`) and the configuration."""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass
from typing import Any

from ..config import QuantConfig, parse_layer_override
from ..errors import ConfigError, ModelError
from .capture import Capture, FloatLayer, Layer
from .primitives import affine_weights


@dataclass(frozen=True)
class LayerPlanEntry:
    name: str
    kind: str  # the layer's kind (`capture.Layer.kind`), or "float" for a layer left unquantized
    weight_bits: int | None
    act_bits: int | None
    reason: str
    weight_grid: str | None = None  # "affine" or "symmetric"; None for a float layer

    def __post_init__(self) -> None:
        if self.weight_grid is None and self.weight_bits is not None:  # a plan saved before grids were chosen
            object.__setattr__(self, "weight_grid", weight_grid(self.weight_bits, "auto"))


def weight_grid(bits: int, choice: str) -> str:
    """The weight grid of a layer with `bits`-bit weights under `QuantConfig.weight_grid`."""
    return "affine" if choice == "auto" and affine_weights(bits) else "symmetric"


@dataclass(frozen=True)
class LayerPlan:
    """The layers' bits and, when every tensor between operators is quantized, the bits of a
    tensor that no quantized layer reads directly (`tensor_bits`; None: only the layers'
    inputs are quantized). Which tensors those are follows from the capture: `tensor_sites`."""

    layers: tuple[LayerPlanEntry, ...]
    tensor_bits: int | None = None

    @property
    def quantized(self) -> tuple[LayerPlanEntry, ...]:
        return tuple(entry for entry in self.layers if entry.kind != "float")

    def to_json(self) -> list[dict[str, Any]]:
        return [asdict(entry) for entry in self.layers]

    @classmethod
    def from_json(cls, data: list[dict[str, Any]], tensor_bits: int | None = None) -> LayerPlan:
        return cls(tuple(LayerPlanEntry(**entry) for entry in data), tensor_bits)


def tensor_sites(capture: Capture, plan: LayerPlan) -> tuple[dict[str, int], dict[str, str]]:
    """The sites quantized under `plan`, with their bits, and the quantized layers that read one
    as it is (layer -> site); none without `plan.tensor_bits`. The output of a layer kept float
    stays float, and so does a tensor that a layer kept float reads as it is. A site gets the
    input bits of the quantized layers reading it as it is (the most of them), else
    `tensor_bits`; a layer whose input bits differ from its site's keeps a quantizer of its
    own."""
    if plan.tensor_bits is None:
        return {}, {}
    entries = {entry.name: entry for entry in plan.quantized}
    bits: dict[str, int] = {}
    for site in capture.sites:
        if site.layer is not None and site.layer not in entries:
            continue
        if any(name == site.name and layer not in entries for layer, name in capture.tied.items()):
            continue  # a layer kept float reads it: its input stays float
        readers = [entries[layer] for layer, name in capture.tied.items() if name == site.name and layer in entries]
        bits[site.name] = max((e.act_bits for e in readers if e.act_bits is not None), default=plan.tensor_bits)
    tied = {layer: site for layer, site in capture.tied.items()
            if layer in entries and site in bits and entries[layer].act_bits == bits[site]}
    return bits, tied


def resolve_layer_plan(capture: Capture, config: QuantConfig) -> LayerPlan:
    """Plan every layer `capture` found, in execution order. The first layer's input is the image
    (`input_bits`); the first and last layers get `first_last_bits` when it is set; then the
    per-layer overrides apply (the last match wins). Weights fddaq cannot quantize stay float
    with their reason. An override that matches no layer is an error: a typo must not silently
    quantize the layer it meant to spare."""
    if not capture.layers:
        raise ModelError("the model has no convolution or linear layer to quantize")
    first, last = capture.layers[0].name, capture.layers[-1].name
    fl_bits = config.first_last_bits
    overrides = [(text, *parse_layer_override(text)) for text in config.layers]
    unmatched = set(config.layers)
    entries = []
    found: list[Layer | FloatLayer] = sorted([*capture.layers, *capture.float_layers], key=lambda layer: layer.order)
    for layer in found:
        name = layer.name
        matching = [o for o in overrides if fnmatch.fnmatchcase(name, o[1])]
        unmatched -= {o[0] for o in matching}
        if isinstance(layer, FloatLayer):
            wanted = [o[0] for o in matching if o[2] is not None]
            if wanted:
                raise ConfigError(f"layer override {wanted[-1]!r}: {name} cannot be quantized ({layer.reason})")
            entries.append(LayerPlanEntry(name, "float", None, None, layer.reason))
            continue
        weight_bits = config.weight_bits
        act_bits: int | None = config.act_bits
        reasons: list[str] = []
        if name in (first, last) and fl_bits is not None:
            weight_bits = act_bits = fl_bits
            reasons.append(f"{'first' if name == first else 'last'} layer at first_last_bits")
        if name == first:
            act_bits = config.input_bits
            reasons.append(f"input image at input_bits={config.input_bits}")
        if matching:
            text, _, override_weights, override_acts = matching[-1]
            if override_weights is None:
                entries.append(LayerPlanEntry(name, "float", None, None, f"kept float: override {text}"))
                continue
            weight_bits, act_bits = override_weights, override_acts
            reasons = [f"override {text}"]
        entries.append(LayerPlanEntry(name, layer.kind, weight_bits, act_bits, "; ".join(reasons) or "default bits",
                                      weight_grid(weight_bits, config.weight_grid)))
    if unmatched:
        text = next(t for t in config.layers if t in unmatched)
        names = [layer.name for layer in found]
        listed = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
        raise ConfigError(f"layer override {text!r} matches no layer; layers: {listed}")
    if all(entry.kind == "float" for entry in entries):
        given = ", ".join(repr(t) for t in config.layers) or "none"
        raise ConfigError(f"no layer is left to quantize: every layer is kept float (layer overrides: {given})")
    return LayerPlan(tuple(entries), config.act_bits if config.all_tensors else None)
