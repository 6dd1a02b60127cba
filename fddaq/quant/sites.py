"""The tensors between operators that a fully quantized graph quantizes, and where they are.

Integer runtimes chain integer kernels only when every tensor between two operators is
quantized: onnxruntime fuses DequantizeLinear -> op -> QuantizeLinear groups into QLinearConv,
QLinearAdd, QLinearMul, QLinearConcat, QLinearAveragePool, QLinearSigmoid, ... and moves Q/DQ
through operators that only move data (MaxPool, Reshape, Flatten, Transpose, Slice, nearest
Resize). fddaq follows the same rules, on what the model computes:

- the output of each layer call and of each call in `SITE_OPS` (add, mul and concat of
  activations, pooling, activations such as sigmoid or hard-sigmoid; hard-swish and SiLU are
  seen as their gate and a product, `fddaq.quant.intercept.GATED`) is quantized, after the
  clips that a runtime folds into the quantization (`FUSED_OPS`: ReLU, ReLU6, Hardtanh,
  clamp; a ReLU is the zero point at 0, a clip a grid within its bounds) and after the
  BatchNorm folded into a layer, when they are its only reader;
- a model output stays float (a last layer's accumulator is what a user reads), also when it
  is returned through data-moving calls (a flattened pooling), and so does what a custom
  `torch.autograd.Function` computes inside (one opaque operation);
- an in-place keyed call whose result the model code drops (`out.add_(x)` as a statement) leaves
  its tensor float in the fake-quant model and in the graph alike (the quantized result is a
  new tensor): the two agree, and the layers reading it get float inputs;
- a layer whose input comes from such a tensor through data-moving calls only (`MOVING_OPS`)
  reads it as it is (`Capture.tied`): its input quantizer is that tensor's quantizer, and no
  second one is applied.

Each such tensor is a `Site`, named by where it is computed: the innermost module making the
call, that module's call index within its parent's call when it is not the first (a ReLU
module a block calls twice), the operation and its index among that module call's keyed
calls: `layer1.0.relu[1]:relu`, `layer1.0:add`, `features.3:cat1`; a layer's output is
`conv1:out` (`conv1:out2` at its third call). The same name is found again by
`CallPositions` when the fake-quant model runs the whole model or replays one module."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import FunctionCtx
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

Func = Callable[..., Any]


def _table(groups: dict[str, tuple[Func, ...]]) -> dict[Func, str]:
    return {func: op for op, funcs in groups.items() for func in funcs}


_T = torch.Tensor
# Calls whose output is a site (for add and mul: when two of their operands are activations). Not
# `mean` or `softmax`: inside a normalization or an attention their outputs feed no layer, and
# a global pooling written as `mean` feeds a layer that quantizes its input anyway.
SITE_OPS: dict[Func, str] = _table({
    "add": (torch.add, _T.add, _T.add_, _T.__add__, _T.__iadd__, _T.__radd__),
    "mul": (torch.mul, _T.mul, _T.mul_, _T.__mul__, _T.__imul__, _T.__rmul__),
    "cat": (torch.cat, torch.concat, torch.concatenate),
    "avgpool": (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                F.adaptive_avg_pool3d),
    "sigmoid": (torch.sigmoid, _T.sigmoid, _T.sigmoid_, F.sigmoid),
    "hardsigmoid": (F.hardsigmoid,),
    "gelu": (F.gelu,),
    "tanh": (torch.tanh, _T.tanh, F.tanh),
    "leaky_relu": (F.leaky_relu,),
})
# Calls a quantizer moves past when they are the only reader of a site's tensor.
FUSED_OPS: dict[Func, str] = _table({
    "relu": (F.relu, torch.relu, torch.relu_, _T.relu, _T.relu_),
    "relu6": (F.relu6,),
    "hardtanh": (F.hardtanh, F.hardtanh_),
    "clamp": (torch.clamp, _T.clamp, _T.clamp_, torch.clip, _T.clip, _T.clip_),
})
# Calls whose output holds values of their first input only: a quantized tensor stays on its grid.
MOVING_OPS: set[Func] = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.flatten, _T.flatten, _T.view, _T.reshape, torch.reshape,
    _T.contiguous, torch.squeeze, _T.squeeze, torch.unsqueeze, _T.unsqueeze, _T.permute, torch.permute, _T.transpose,
    torch.transpose, _T.__getitem__, torch.chunk, _T.chunk, torch.split, _T.split, _T.clone, F.pad, F.interpolate,
    F.pixel_shuffle, F.pixel_unshuffle,
}


def keyed_op(func: Func) -> str | None:
    """The operation name of a call whose position `CallPositions` counts: a site op, a fused op
    or a batch norm (a site after a folded BatchNorm is named after it: before folding the
    fake-quant model computes the BatchNorm, after folding its call is the identity)."""
    return SITE_OPS.get(func) or FUSED_OPS.get(func) or ("batch_norm" if func is F.batch_norm else None)


def inside_custom_function() -> bool:
    """Whether the running code is inside the forward of a custom `torch.autograd.Function`
    (EfficientNet-PyTorch's memory-efficient swish): an opaque operation to autograd and to
    torch's ONNX exporter, so nothing inside it can be quantized on its own."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "forward" and isinstance(frame.f_locals.get("ctx"), FunctionCtx):
            return True  # forward(ctx, ...), called by the C++ of Function.apply
        owner = frame.f_locals.get("cls") if frame.f_code.co_name == "apply" else None
        if isinstance(owner, type) and issubclass(owner, torch.autograd.Function):
            return True  # forward(...) with a separate setup_context, under Function.apply
        frame = frame.f_back
    return False


def moves_data(func: Func, numbers: tuple[Any, ...], options: dict[str, Any]) -> bool:
    """Whether a call only moves the values of its first input (`numbers`: its positional
    arguments after the first; `options`: its keyword arguments): zero padding, nearest
    interpolation and the calls of `MOVING_OPS`."""
    if func not in MOVING_OPS:
        return False
    if func is F.pad:
        mode = numbers[1] if len(numbers) > 1 else options.get("mode", "constant")
        value = numbers[2] if len(numbers) > 2 else options.get("value", None)
        return mode == "constant" and not value
    if func is F.interpolate:
        mode = numbers[2] if len(numbers) > 2 else options.get("mode", "nearest")
        return mode in ("nearest", "nearest-exact")
    return True


@dataclass(frozen=True)
class Site:
    """A tensor between operators that the fully quantized graph quantizes."""

    name: str
    op: str  # "out" for a layer's output, else the op of `SITE_OPS` or `FUSED_OPS` that computes it
    module: str  # the innermost module making the call ("" for the model's own forward)
    layer: str | None  # the layer whose output it is (through fused ops), if any
    bounds: tuple[float, float] | None  # the clip it comes from (see `ActivationQuantizer.bounds`)
    order: int  # the index of the call computing it


def layer_output(layer: str, call: int) -> str:
    """The site name of a layer's output at its `call`-th call."""
    return f"{layer}:out{call or ''}"


@dataclass
class _Frame:
    path: str
    call: int  # index among the calls of this module within its parent's call
    children: dict[str, int] = field(default_factory=dict)
    ops: dict[str, int] = field(default_factory=dict)


class CallPositions:
    """The name (see the module doc) of each keyed call of a forward of `model`'s modules,
    whether the forward starts at the model or at one of its modules."""

    def __init__(self, model: nn.Module) -> None:
        self.names = {id(module): name for name, module in model.named_modules()}
        self.frames: list[_Frame] = []

    def enter(self, module: nn.Module) -> None:
        path = self.names.get(id(module))
        if path is None:  # a wrapper, or a module created in forward: transparent
            return
        siblings = self.frames[-1].children if self.frames else {}
        call = siblings.get(path, 0)
        siblings[path] = call + 1
        self.frames.append(_Frame(path, call))

    def leave(self, module: nn.Module) -> None:
        path = self.names.get(id(module))
        if path is not None and self.frames and self.frames[-1].path == path:
            self.frames.pop()

    def module(self) -> str:
        """The path of the running module."""
        return self.frames[-1].path if self.frames else ""

    def name(self, op: str) -> tuple[str, str]:
        """(site name, module path) of the next call of `op` in the running module."""
        frame = self.frames[-1] if self.frames else _Frame("", 0)
        index = frame.ops.get(op, 0)
        frame.ops[op] = index + 1
        where = frame.path + (f"[{frame.call}]" if frame.call else "")
        return f"{where}:{op}{index or ''}", frame.path

    @contextlib.contextmanager
    def tracked(self) -> Iterator[CallPositions]:
        """Follow the running modules while active (a fresh count for each forward)."""
        self.frames = []
        handles = [register_module_forward_pre_hook(lambda module, args: self.enter(module)),
                   register_module_forward_hook(lambda module, args, out: self.leave(module))]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self.frames = []


Value = tuple[int, int]  # (tensor serial, version): an in-place call makes a new version


@dataclass
class SiteCall:
    """What `find_sites` needs of one recorded call."""

    func: Func
    numbers: tuple[Any, ...]  # positional arguments after the first, tensors left out
    options: dict[str, Any]  # keyword arguments, tensors left out
    ins: tuple[Value, ...]  # the activation values it reads (metadata reads excluded)
    outs: tuple[Value, ...]  # the values it writes
    name: str | None = None  # its site name, for a layer call or a keyed call
    module: str = ""  # the innermost module making it
    layer: str | None = None  # the layer it is a call of


def find_sites(
    calls: Sequence[SiteCall],
    returned: set[Value],
    folded: set[int],
    bounds: Callable[[int], tuple[float, float] | None],
) -> tuple[tuple[Site, ...], dict[str, str]]:
    """The sites of a recorded forward and the layers that read one as it is (layer -> site),
    see the module doc. `folded`: indices of the BatchNorm calls folded into their layer;
    `bounds(index)`: the clip of call `index`'s output."""
    readers: dict[Value, list[int]] = {}
    producer: dict[Value, int] = {}
    for index, call in enumerate(calls):
        for value in dict.fromkeys(call.ins):
            readers.setdefault(value, []).append(index)
        for value in call.outs:
            producer[value] = index
    returned = set(returned)
    for value in list(returned):  # what is returned through data-moving calls (a flattened pool) too
        source = producer.get(value)
        while source is not None and calls[source].ins and moves_data(calls[source].func, calls[source].numbers,
                                                                      calls[source].options):
            value = calls[source].ins[0]
            returned.add(value)
            source = producer.get(value)
    sites: dict[Value, Site] = {}
    for index, call in enumerate(calls):
        op = "out" if call.layer is not None else SITE_OPS.get(call.func)
        if op is None or len(call.outs) != 1 or not call.ins or call.name is None:
            continue
        if op in ("add", "mul") and len(call.ins) < 2:
            continue  # a product or sum with a constant: no integer kernel takes it
        value, last = call.outs[0], index
        while value not in returned and len(readers.get(value, ())) == 1:
            reader = readers[value][0]
            after = calls[reader]
            fused = reader in folded or (after.func in FUSED_OPS and after.ins[:1] == (value,)
                                         and (FUSED_OPS[after.func] == "relu" or bounds(reader) is not None))
            if not fused or len(after.outs) != 1 or after.name is None:  # unnamed: inside a custom function
                break
            value, last = after.outs[0], reader
        if value in returned or value in sites:
            continue
        final = calls[last]
        final_op = op if last == index else keyed_op(final.func)
        assert final.name is not None and final_op is not None  # a fused call is keyed and named
        sites[value] = Site(final.name, final_op, final.module, call.layer, bounds(last) if last != index else None,
                            last)
    tied: dict[str, set[str]] = {}
    for call in calls:
        if call.layer is None:
            continue
        read: Value | None = call.ins[0] if call.ins else None
        while read is not None and read not in sites:
            source = producer.get(read)
            mover = calls[source] if source is not None else None
            read = mover.ins[0] if mover is not None and mover.ins and moves_data(mover.func, mover.numbers, mover.options) else None
        tied.setdefault(call.layer, set()).add(sites[read].name if read is not None else "")
    ordered = tuple(sorted(sites.values(), key=lambda site: site.order))
    return ordered, {layer: next(iter(names)) for layer, names in tied.items() if len(names) == 1 and "" not in names}
