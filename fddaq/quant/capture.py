"""What a model computes, found by running it once on an example input.

`capture(model, example)` runs the float model under a recording `Interceptor` and returns a
`Capture`:
- its layers, in the order they are first called: every convolution and `F.linear` whose
  weight is a parameter or is computed from parameters alone, whichever module makes the call
  (a layer is named after its weight: `blocks.0.conv` for `blocks.0.conv.weight`);
- weights it cannot quantize, with the reason (a parameter used by `torch.matmul`, say);
- the BatchNorms that fold into a layer: an `F.batch_norm` in eval mode that is the only
  reader of a layer's output, each called once;
- the clip (ReLU6, Hardtanh, clamp) each layer's input comes from, through pooling,
  flattening and zero padding;
- its outputs (a tensor, or tuples, lists and dicts of them), by name.

A forward that fails, or that turns a tensor computed from the input into a Python value (an
`if` or `assert` on tensor values: a traced graph would keep one branch for every input), is a
`ModelError` naming the operation, the module and the source line."""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils._pytree import MappingKey, SequenceKey, tree_flatten_with_path
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import ConfigError, ModelError, first_line
from .intercept import (
    LAYER_FUNCTIONS,
    Dataflow,
    Interceptor,
    batch_norm_arguments,
    channel_axis,
    layer_arguments,
    tensors,
)
from .sites import CallPositions, Site, SiteCall, Value, find_sites, inside_custom_function, keyed_op, layer_output

SINGLE_OUTPUT = "logits"  # the name of a model's output when it returns one tensor

# Conversions of a tensor to a Python value: on a tensor computed from the input, the traced
# graph would hard-code their result.
_CONVERSIONS = {torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.__int__, torch.Tensor.__float__,
                torch.Tensor.__index__, torch.Tensor.tolist, torch.Tensor.numpy}
# Products whose parameter operand would be a layer if fddaq could quantize it there.
_PRODUCTS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.mm,
             torch.Tensor.mm, torch.bmm, torch.Tensor.bmm, torch.einsum, torch.addmm, F.bilinear,
             F.multi_head_attention_forward}
# Calls whose output stays within the range of their (first) input.
_RANGE_KEEPING = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                  F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.dropout, F.dropout2d,
                  torch.flatten, torch.Tensor.flatten, torch.Tensor.view, torch.Tensor.reshape, torch.reshape,
                  torch.Tensor.contiguous, torch.squeeze, torch.Tensor.squeeze, torch.unsqueeze,
                  torch.Tensor.unsqueeze, torch.Tensor.mean, torch.mean}
_CLAMPS = {torch.clamp, torch.Tensor.clamp, torch.Tensor.clamp_, torch.clip, torch.Tensor.clip, torch.Tensor.clip_}


@dataclass(frozen=True)
class Layer:
    """A convolution or linear layer: `weight` is the parameter passed as its weight (None when
    the weight is computed from `sources`), `bias` the parameter passed as its bias (if any)."""

    name: str
    kind: str  # a value of LAYER_FUNCTIONS
    channels: int  # output channels: per-channel weight scales
    weight: str | None
    sources: tuple[str, ...]
    bias: str | None
    calls: int
    module_type: str
    where: str
    order: int  # index of its first call


@dataclass(frozen=True)
class FloatLayer:
    """A weight fddaq finds but cannot quantize, and why."""

    name: str
    reason: str
    order: int


@dataclass(frozen=True)
class BatchNormFold:
    """A BatchNorm that folds into `layer`: the names of its tensors, and its epsilon."""

    layer: str
    running_mean: str
    running_var: str
    weight: str | None
    bias: str | None
    eps: float


@dataclass(frozen=True)
class Output:
    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Capture:
    input_shape: tuple[int, ...]  # of one example, without the batch dimension
    layers: tuple[Layer, ...]
    float_layers: tuple[FloatLayer, ...]
    folds: tuple[BatchNormFold, ...]
    clips: dict[str, tuple[float, float]] = field(default_factory=dict)
    outputs: tuple[Output, ...] = ()
    sites: tuple[Site, ...] = ()  # the tensors a fully quantized graph quantizes (see `sites`)
    tied: dict[str, str] = field(default_factory=dict)  # layer -> the site it reads as it is

    def layer(self, name: str) -> Layer:
        return next(layer for layer in self.layers if layer.name == name)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(output.name for output in self.outputs)


@torch.no_grad()
def capture(model: nn.Module, example: Tensor) -> Capture:
    """Run `model` (eval mode) on `example` and return what it computes (see the module doc)."""
    model.eval()
    recorder = _Recorder(model)
    try:
        with recorder.modules_tracked():
            recorder.flow.mark_input(example)
            with recorder:
                out = model(example)
    except ModelError:
        raise
    except Exception as exc:  # the user's forward: any type
        raise ModelError(
            f"the model fails on an input of shape {tuple(example.shape)} in {recorder.location(exc)}: {first_line(exc)}"
        ) from exc
    if recorder.problems:
        raise ModelError(recorder.problems[0])
    return recorder.result(tuple(example.shape[1:]), out)


def output_leaves(out: Any) -> list[tuple[str, Tensor]]:
    """(name, tensor) of every tensor a forward returns: a lone tensor is `SINGLE_OUTPUT`;
    inside tuples, lists and dicts, the path of keys and indices (`out`, `aux.0`, `output.1`
    for the second of a tuple: ONNX names may not start with a digit in torch's exporter)."""
    leaves, _ = tree_flatten_with_path(out)
    named = []
    for path, leaf in leaves:
        if isinstance(leaf, Tensor):
            parts = [str(k.key) if isinstance(k, MappingKey) else str(k.idx) if isinstance(k, SequenceKey) else str(k)
                     for k in path]
            name = ".".join(parts) or SINGLE_OUTPUT
            named.append((f"output.{name}" if name[0].isdigit() else name, leaf))
    return named


def select_output(out: Any, name: str | None) -> Any:
    """The output called `name` (see `output_leaves`) of what a forward returned; everything
    when `name` is None."""
    if name is None or (name == SINGLE_OUTPUT and isinstance(out, Tensor)):
        return out
    for leaf_name, tensor in output_leaves(out):
        if leaf_name == name:
            return tensor
    raise ModelError(f"the model returned no output called {name!r}")


def resolve_output(outputs: tuple[Output, ...], choice: str | None = None) -> str:
    """The output that is scored and distilled: `choice` (a name or an index) when given; else
    the only one, else `out`, else the first."""
    names = [output.name for output in outputs]
    if not names:
        raise ModelError("the model returns no tensor")
    if choice is None:
        return names[0] if len(names) == 1 or "out" not in names else "out"
    if choice in names:
        return choice
    if choice.lstrip("-").isdigit() and -len(names) <= int(choice) < len(names):
        return names[int(choice)]
    raise ConfigError(f"`output` {choice!r} is not an output of the model; its outputs: {', '.join(names)} "
                     f"(or an index 0..{len(names) - 1})")


def layer_name(weight: str) -> str:
    """A layer's name from its weight parameter: `conv.weight` -> `conv`, `attn.in_proj_weight`
    -> `attn.in_proj`; a pruned or parametrized weight (`conv.weight_orig`,
    `conv.parametrizations.weight.original1`) -> `conv`; anything else unchanged."""
    owner, marker, _ = weight.partition("parametrizations.")
    if marker:
        return owner.rstrip(".") or weight
    owner, _, leaf = weight.rpartition(".")
    if leaf in ("weight", "weight_orig") and owner:
        return owner
    if leaf.endswith("_weight") and len(leaf) > len("_weight"):
        return f"{owner}.{leaf[: -len('_weight')]}" if owner else leaf[: -len("_weight")]
    return weight


# ---------------------------------------------------------------- where things happen

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_HERE = os.path.dirname(os.path.abspath(__file__)) + os.sep  # fddaq/quant: the interception itself


def _outside(filename: str) -> bool:
    return not (filename.startswith(_TORCH_DIR) or filename.startswith(_HERE) or filename.startswith("<"))


def short_location(filename: str, line: int) -> str:
    """`file:line`, relative to site-packages or to the current folder when inside one."""
    marker = f"site-packages{os.sep}"
    if marker in filename:
        filename = filename.split(marker, 1)[1]
    else:
        try:
            relative = os.path.relpath(filename)
            filename = relative if not relative.startswith("..") else filename
        except ValueError:  # another drive
            pass
    return f"{filename}:{line}"


def caller() -> str:
    """The innermost frame of the running code outside torch and fddaq's interception."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if _outside(frame.f_code.co_filename):
            return short_location(frame.f_code.co_filename, frame.f_lineno)
        frame = frame.f_back
    return "unknown location"


def function_name(func: Callable[..., Any]) -> str:
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    module = getattr(func, "__module__", None)
    if name.startswith("TensorBase.") or name.startswith("_TensorBase."):
        return "Tensor." + name.split(".", 1)[1]
    if module in ("torch.nn.functional", "torch._C._nn"):
        return f"torch.nn.functional.{getattr(func, '__name__', name)}"
    if name.startswith("_VariableFunctionsClass."):
        return "torch." + name.split(".", 1)[1]
    return f"{module}.{name}" if module and not module.startswith("torch._C") else name


# ---------------------------------------------------------------- recording

# Calls that read only a tensor's metadata (shape, dtype, ...): not a use of its values.
_METADATA = {"size", "dim", "numel", "nelement", "ndimension", "stride", "is_contiguous", "element_size", "__len__",
             "__get__"}  # property getters (shape, ndim, dtype, device, ...)


@dataclass
class _Call(SiteCall):
    inputs: tuple[int, ...] = ()  # serial numbers of its tensor arguments


@dataclass
class _Norm:
    """What a batch-norm call needs for a fold."""

    input: int  # serial number
    input_dim: int
    names: dict[str, str | None]  # running_mean, running_var, weight, bias -> parameter or buffer name
    given: dict[str, bool]  # weight, bias passed at all
    channels: int
    training: bool
    eps: float
    index: int


class _Recorder(Interceptor):
    flow: Dataflow  # always given

    def __init__(self, model: nn.Module) -> None:
        super().__init__(Dataflow(model))
        self.parameters = {name for name, _ in model.named_parameters()}
        self.module_names = {id(module): name for name, module in model.named_modules()}
        self.modules = dict(model.named_modules())
        self.stack: list[str] = []
        self.serials: MutableMapping[Tensor, int] = WeakIdKeyDictionary()  # tensor -> serial number (ids of dead tensors get reused)
        self.versions: dict[int, int] = defaultdict(int)  # serial -> in-place writes so far
        self.positions = CallPositions(model)
        self.counter = itertools.count()
        self.calls: list[_Call] = []
        self.producers: dict[int, list[int]] = defaultdict(list)  # serial -> calls that wrote it
        self.readers: dict[int, list[int]] = defaultdict(list)  # serial -> calls that read its values
        self.norms: list[_Norm] = []
        self.layers: dict[str, dict[str, Any]] = {}  # layer -> the fields of its `Layer`
        self.identities: dict[tuple[str, object], str] = {}  # how a layer's weight is found -> its name
        self.layer_outputs: dict[str, int] = {}  # layer -> serial of its first call's output
        self.layer_inputs: dict[str, list[tuple[int, int]]] = defaultdict(list)  # layer -> (input serial, call) per call
        self.hidden: dict[str, FloatLayer] = {}
        self.problems: list[str] = []

    def serial(self, tensor: Tensor) -> int:
        number = self.serials.get(tensor)
        if number is None:
            number = self.serials[tensor] = next(self.counter)
        return number
    # -- module path of each call

    @contextlib.contextmanager
    def modules_tracked(self) -> Iterator[None]:
        """While active, `stack` holds the modules being run, innermost last (left as it is
        when a forward fails: the error then says where)."""

        def enter(module: nn.Module, args: tuple[Any, ...]) -> None:
            self.stack.append(self._module_name(module))
            self.positions.enter(module)

        def leave(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if self.stack:
                self.stack.pop()
            self.positions.leave(module)

        handles = [register_module_forward_pre_hook(enter), register_module_forward_hook(leave)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _module_name(self, module: nn.Module) -> str:
        name = self.module_names.get(id(module))
        if name is None:
            return f"a {type(module).__name__} created in forward"
        return f"module '{name}' ({type(module).__name__})" if name else f"the model ({type(module).__name__})"

    def here(self) -> str:
        return f"{self.stack[-1] if self.stack else 'the model'} at {caller()}"

    def location(self, exc: BaseException) -> str:
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if _outside(f.filename)]
        where = short_location(frames[-1].filename, frames[-1].lineno or 0) if frames else "unknown location"
        return f"{self.stack[-1] if self.stack else 'the model'} at {where}"

    # -- every call

    def after(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        inputs, outputs = tensors((args, kwargs)), tensors(out)
        from_input = any(self.flow.is_activation(t) for t in inputs)
        if func in _CONVERSIONS and from_input:
            self.problems.append(
                f"cannot export: {self.here()} converts a tensor computed from the input to a Python value "
                f"({function_name(func)}, e.g. an `if` or `assert` on tensor values): the exported graph would keep "
                "what this one input gave for every input. Compute it with tensor operations (torch.where) instead"
            )
        index = len(self.calls)
        kind = LAYER_FUNCTIONS.get(func)
        layer = None
        if kind is not None:
            layer = self._layer(kind, args, kwargs, out, index)
        elif func is F.batch_norm:
            self._norm(batch_norm_arguments(args, kwargs), index)
        elif func in _PRODUCTS and from_input:
            self._hidden(func, inputs)
        metadata = getattr(func, "__name__", None) in _METADATA
        read = tuple(self._value(t) for t in inputs if not metadata and self.flow.is_activation(t))
        serials = {self.serial(t) for t in inputs}
        for tensor in outputs:  # an in-place call writes a new version of its input
            if self.serial(tensor) in serials:
                self.versions[self.serial(tensor)] += 1
        name, module, op = None, "", keyed_op(func)
        if layer is not None:
            name, module = layer_output(layer, self.layers[layer]["calls"] - 1), self.positions.module()
        elif op is not None:
            name, module = self.positions.name(op)  # counted in any case: the fake-quant model counts it too
            name = None if inside_custom_function() else name
        self.calls.append(_Call(func, tuple(map(_plain, args[1:])), {k: _plain(v) for k, v in kwargs.items()}, read,
                                tuple(map(self._value, outputs)), name, module, layer, tuple(map(self.serial, inputs))))
        if not metadata:
            for tensor in inputs:
                self.readers[self.serial(tensor)].append(index)
        for tensor in outputs:
            self.producers[self.serial(tensor)].append(index)
        super().after(func, args, kwargs, out)

    def _value(self, tensor: Tensor) -> Value:
        return self.serial(tensor), self.versions[self.serial(tensor)]

    def _layer(self, kind: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any, index: int) -> str | None:
        """The layer this call is a call of (recorded), None when it is not a layer."""
        x, weight, bias, _, _ = layer_arguments(args, kwargs)
        sources = self.flow.sources(weight) if isinstance(weight, Tensor) else None
        if sources is None or not sources & self.parameters:
            return None  # a product of activations, or of a buffer: not a layer
        direct = self.flow.named.get(id(weight))
        direct = direct if direct in self.parameters else None
        identity = ("parameter", direct) if direct else ("computed", sources)
        name = self.identities.get(identity)
        if name is None:  # a new layer; a weight used directly and computed from the same parameter: two
            base = layer_name(direct or _primary(sources & self.parameters, weight, self))
            name = base if base not in self.layers else f"{base}#{sum(n.split('#')[0] == base for n in self.layers) + 1}"
            self.identities[identity] = name
            bias_name = self.flow.named.get(id(bias)) if isinstance(bias, Tensor) else None
            owner = self.modules.get(base) or self.modules.get((direct or sorted(sources)[0]).rpartition(".")[0])
            self.layers[name] = {
                "name": name, "kind": kind, "channels": int(weight.shape[channel_axis(kind)]), "weight": direct,
                "sources": tuple(sorted(sources)), "bias": bias_name if bias_name in self.parameters else None,
                "calls": 0, "module_type": type(owner).__name__ if owner is not None else "function",
                "where": caller(), "order": index,
            }
            if isinstance(out, Tensor):
                self.layer_outputs[name] = self.serial(out)
        self.layers[name]["calls"] += 1
        self.layer_inputs[name].append((self.serial(x), index))
        return name

    def _norm(self, arguments: dict[str, Any], index: int) -> None:
        keys = ("running_mean", "running_var", "weight", "bias")
        names = {k: self.flow.named.get(id(arguments[k])) if isinstance(arguments[k], Tensor) else None for k in keys}
        mean, x = arguments["running_mean"], arguments["input"]
        self.norms.append(_Norm(
            self.serial(x), x.dim(), names, {k: arguments[k] is not None for k in ("weight", "bias")},
            mean.numel() if isinstance(mean, Tensor) else -1, bool(arguments["training"]), float(arguments["eps"]), index,
        ))

    def _hidden(self, func: Callable[..., Any], inputs: list[Tensor]) -> None:
        for tensor in inputs:
            sources = self.flow.sources(tensor)
            if sources is None or tensor.dim() < 2 or not sources & self.parameters:
                continue
            name = layer_name(sorted(sources & self.parameters)[0])
            if name not in self.hidden:
                self.hidden[name] = FloatLayer(
                    name, f"kept float: its weight is used by {function_name(func)} in {self.here()}, and fddaq "
                          "quantizes convolutions and torch.nn.functional.linear", len(self.calls))

    # -- after the forward

    def result(self, input_shape: tuple[int, ...], out: Any) -> Capture:
        layers = tuple(Layer(**info) for info in self.layers.values())
        names = {layer.name for layer in layers}
        hidden = tuple(h for name, h in self.hidden.items() if name not in names)
        leaves = output_leaves(out)
        outputs = tuple(Output(name, tuple(t.shape[1:])) for name, t in leaves)
        returned = {self.serial(t) for _, t in leaves}
        clips: dict[str, tuple[float, float]] = {}
        for layer in layers:  # the clip of every call (they share one input quantizer), their union
            calls = self.layer_inputs[layer.name]
            bounds = [b for b in (self._bounds(*call) for call in calls) if b is not None]
            if bounds and len(bounds) == len(calls):
                clips[layer.name] = (min(b[0] for b in bounds), max(b[1] for b in bounds))
        folds, folded = self._folds(layers, returned)
        sites, tied = find_sites(self.calls, {self._value(t) for _, t in leaves}, folded,
                                 lambda index: self._bounds(self.calls[index].outs[0][0], index + 1))
        return Capture(input_shape, layers, hidden, folds, clips, outputs, sites, tied)

    def _folds(self, layers: tuple[Layer, ...], returned: set[int]) -> tuple[tuple[BatchNormFold, ...], set[int]]:
        """The batch norms that fold, and the indices of their calls. A batch norm folds into a
        layer called once when it is the only use of the layer's output (not returned by the
        model either) and it is called once, in eval mode, with named running statistics of
        the layer's channels, and not inside a custom autograd function (an opaque operation:
        its call gets no name, so the fake-quant model could not make it the identity)."""
        uses = Counter(norm.names["running_mean"] for norm in self.norms)
        by_call = {norm.index: norm for norm in self.norms}
        folds: list[BatchNormFold] = []
        calls: set[int] = set()
        for layer in layers:
            output = self.layer_outputs.get(layer.name)
            readers = self.readers.get(output, []) if output is not None else []
            norm = by_call.get(readers[0]) if len(readers) == 1 else None
            if norm is None or self.calls[norm.index].name is None:
                continue
            mean, var = norm.names["running_mean"], norm.names["running_var"]
            if (
                mean is None or var is None or uses[mean] != 1 or layer.calls != 1 or output in returned
                or norm.input != output or norm.training
                or any(norm.given[key] and norm.names[key] is None for key in ("weight", "bias"))
                or norm.channels != layer.channels or (layer.kind == "linear" and norm.input_dim != 2)
            ):
                continue
            folds.append(BatchNormFold(layer.name, mean, var, norm.names["weight"], norm.names["bias"], norm.eps))
            calls.add(norm.index)
        return tuple(folds), calls

    def _bounds(self, tensor: int, before: int) -> tuple[float, float] | None:
        """The clip `tensor`, as read by call `before`, comes from, through range-keeping calls
        and zero padding."""
        index = next((i for i in reversed(self.producers.get(tensor, [])) if i < before), None)
        if index is None:
            return None
        call = self.calls[index]
        func, numbers, options = call.func, call.numbers, call.options
        if func is F.relu6:
            return 0.0, 6.0
        if func is F.hardtanh:
            low = numbers[0] if len(numbers) > 0 else options.get("min_val", -1.0)
            high = numbers[1] if len(numbers) > 1 else options.get("max_val", 1.0)
            return float(low), float(high)
        if func in _CLAMPS:
            low = numbers[0] if len(numbers) > 0 else options.get("min")
            high = numbers[1] if len(numbers) > 1 else options.get("max")
            if isinstance(low, (int, float)) and isinstance(high, (int, float)):
                return float(low), float(high)
            return None
        if not call.inputs:
            return None
        if func is F.pad:
            mode = numbers[1] if len(numbers) > 1 else options.get("mode", "constant")
            value = numbers[2] if len(numbers) > 2 else options.get("value", None)
            bounds = self._bounds(call.inputs[0], index) if mode == "constant" and not value else None
            return bounds if bounds is not None and bounds[0] <= 0 <= bounds[1] else None
        if func in _RANGE_KEEPING:
            return self._bounds(call.inputs[0], index)
        return None


def _plain(value: Any) -> Any:
    """A call argument as recorded: None for a tensor."""
    return None if isinstance(value, Tensor) else value


def _primary(parameters: frozenset[str], weight: Tensor, recorder: _Recorder) -> str:
    """The parameter a computed weight is named after: the first (by name) whose name says it is
    a weight (`weight`, `*_weight`, `weight_orig`, `parametrizations.weight.*`), else the first
    of the weight's shape, else the first."""
    ordered = sorted(parameters)
    for name in ordered:
        leaf = name.rpartition(".")[2]
        if leaf.endswith("weight") or leaf == "weight_orig" or "parametrizations.weight." in name:
            return name
    shaped = [n for n in ordered if tuple(_tensor(recorder, n).shape) == tuple(weight.shape)]
    return (shaped or ordered)[0]


def _tensor(recorder: _Recorder, name: str) -> Tensor:
    owner, _, leaf = name.rpartition(".")
    tensor: Tensor = getattr(recorder.modules[owner], leaf)
    return tensor
