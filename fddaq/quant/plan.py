"""Which layers are quantized, at which bits, and why: a pure function of the model, the
layers' execution order and the configuration."""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass

from torch import nn

from ..config import QuantConfig, parse_layer_override
from ..errors import ConfigError


@dataclass(frozen=True)
class LayerPlanEntry:
    name: str
    kind: str  # "conv", "linear", or "float" for a layer left unquantized
    weight_bits: int | None
    act_bits: int | None
    reason: str


@dataclass(frozen=True)
class LayerPlan:
    layers: tuple[LayerPlanEntry, ...]

    @property
    def quantized(self) -> tuple[LayerPlanEntry, ...]:
        return tuple(entry for entry in self.layers if entry.kind != "float")

    def to_json(self) -> list[dict]:
        return [asdict(entry) for entry in self.layers]

    @classmethod
    def from_json(cls, data: list[dict]) -> "LayerPlan":
        return cls(tuple(LayerPlanEntry(**entry) for entry in data))


def _unsupported_reason(module: nn.Module) -> str | None:
    if isinstance(module, nn.Conv2d):
        if type(module).forward is not nn.Conv2d.forward:
            return f"{type(module).__name__} overrides Conv2d.forward"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} is not supported"
        return None
    if isinstance(module, nn.Linear):
        if type(module).forward is not nn.Linear.forward:
            return f"{type(module).__name__} overrides Linear.forward"
        return None
    return "not a Conv2d or Linear"


def resolve_layer_plan(model: nn.Module, order: list[str], config: QuantConfig) -> LayerPlan:
    """Plan every Conv2d/Linear of `model`, in execution order `order` (module names as called
    by one forward pass). The first layer's input is the image (`input_bits`); the first and
    last layers get `first_last_bits` when it is set; then the per-layer overrides apply (the
    last match wins). An override that matches no layer is an error: a typo must not silently
    quantize the layer it meant to spare."""
    modules = dict(model.named_modules())
    first, last = order[0], order[-1]
    fl_bits = config.first_last_bits
    overrides = [(text, *parse_layer_override(text)) for text in config.layers]
    unmatched = set(config.layers)
    entries = []
    for name in order:
        module = modules[name]
        unsupported = _unsupported_reason(module)
        matching = [o for o in overrides if fnmatch.fnmatchcase(name, o[1])]
        unmatched -= {o[0] for o in matching}
        if unsupported is not None:
            wanted = [o[0] for o in matching if o[2] is not None]
            if wanted:
                raise ConfigError(f"layer override {wanted[-1]!r}: {name} cannot be quantized ({unsupported})")
            entries.append(LayerPlanEntry(name, "float", None, None, f"kept float: {unsupported}"))
            continue
        kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
        weight_bits, act_bits, reasons = config.weight_bits, config.act_bits, []
        if name in (first, last) and fl_bits is not None:
            weight_bits = act_bits = fl_bits
            reasons.append(f"{'first' if name == first else 'last'} layer at first_last_bits")
        if name == first:
            act_bits = config.input_bits
            reasons.append(f"input image at input_bits={config.input_bits}")
        if matching:
            text, _, weight_bits, act_bits = matching[-1]
            if weight_bits is None:
                entries.append(LayerPlanEntry(name, "float", None, None, f"kept float: override {text}"))
                continue
            reasons = [f"override {text}"]
        entries.append(LayerPlanEntry(name, kind, weight_bits, act_bits, "; ".join(reasons) or "default bits"))
    if unmatched:
        text = next(t for t in config.layers if t in unmatched)
        names = ", ".join(order[:8]) + (" ..." if len(order) > 8 else "")
        raise ConfigError(f"layer override {text!r} matches no layer; layers: {names}")
    return LayerPlan(tuple(entries))
