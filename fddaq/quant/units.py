"""The units of block-wise reconstruction, found from how the model's modules call its layers.

One forward of the quantized model records, for every module call, the quantized layers it
runs (directly or through the modules it calls). A module can be a unit when it is called
once, takes one tensor, returns one tensor and runs every call of its layers itself: then it
can be replayed alone on a cached input. The partition, from the top: a module is split into
the units its children give when at least two of those are blocks (two or more layers), or
when it has more than `MAX_UNIT_LAYERS` layers and its children cover them all; otherwise it
is one unit. A residual block (its convolutions and the add), an inverted residual, a stem
and a head come out as units in ResNets, MobileNets, EfficientNets and U-Nets alike, with no
knowledge of their names. A layer called directly by a module that cannot be a unit stays
outside every unit (it keeps its calibrated quantizers)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

from ..device import model_device
from .modules import QuantizedModel, QuantLayer

MAX_UNIT_LAYERS = 6


@dataclass(frozen=True)
class Unit:
    module: str  # its path in the model ("" is the whole model)
    layers: tuple[str, ...]  # the quantized layers it runs, in call order


@dataclass
class _Calls:
    count: int = 0
    replayable: bool = True  # one tensor argument, a tensor returned
    layers: dict[str, int] = field(default_factory=dict)  # layer -> calls inside this module
    children: dict[str, None] = field(default_factory=dict)  # modules it calls, in call order


@torch.no_grad()
def find_units(qmodel: QuantizedModel) -> list[Unit]:
    """The units of `qmodel`, in the order they run (see the module doc)."""
    names = {id(module): name for name, module in qmodel.model.named_modules()}
    calls: dict[str, _Calls] = defaultdict(_Calls)
    layer_calls: dict[str, int] = defaultdict(int)
    first: dict[str, int] = {}
    stack: list[str] = []

    def enter(module: nn.Module, args: tuple[Any, ...]) -> None:
        if isinstance(module, QuantLayer) and module.name:
            layer_calls[module.name] += 1
            first.setdefault(module.name, len(first))
            for name in stack:
                calls[name].layers[module.name] = calls[name].layers.get(module.name, 0) + 1
            return
        found = names.get(id(module))
        if found is None:
            return
        if stack:
            calls[stack[-1]].children[found] = None
        record = calls[found]
        record.count += 1
        record.replayable &= len(args) == 1 and isinstance(args[0], Tensor)
        stack.append(found)

    def leave(module: nn.Module, args: tuple[Any, ...], out: object) -> None:
        name = names.get(id(module))
        if name is None or isinstance(module, QuantLayer) or not stack or stack[-1] != name:
            return
        stack.pop()
        calls[name].replayable &= isinstance(out, Tensor)

    handles = [register_module_forward_pre_hook(enter), register_module_forward_hook(leave)]
    training = qmodel.training
    try:
        qmodel.eval().forward_all(torch.zeros(2, *qmodel.capture.input_shape, device=model_device(qmodel)))
    finally:
        for handle in handles:
            handle.remove()
        qmodel.train(training)

    def can_be_unit(name: str) -> bool:
        record = calls[name]
        return (record.count == 1 and record.replayable and bool(record.layers)
                and all(layer_calls[layer] == n for layer, n in record.layers.items()))

    def choose(name: str) -> list[str]:
        record = calls[name]
        inner = [unit for child in record.children if calls[child].layers for unit in choose(child)]
        covered = {layer for unit in inner for layer in calls[unit].layers}
        blocks = sum(len(calls[unit].layers) >= 2 for unit in inner)
        complete = covered == set(record.layers)
        if can_be_unit(name) and not (blocks >= 2 or (complete and len(record.layers) > MAX_UNIT_LAYERS)):
            return [name]
        return inner

    units = [Unit(name, tuple(sorted(calls[name].layers, key=first.__getitem__))) for name in choose("")]
    return sorted(units, key=lambda unit: first[unit.layers[0]])
