"""Seeing what a model computes, whatever module computes it.

Model code nobody here wrote convolves in `nn.Conv2d` subclasses with their own `forward`, in
`F.conv2d` calls on a module's weights, on standardized weights, in transposed convolutions or
inside `nn.MultiheadAttention`. Module classes and names cannot keep up with it; the calls can:
a torch function mode (`TorchFunctionMode`) sees every torch call a forward makes, with its
arguments. An `Interceptor` routes

- each layer call (`LAYER_FUNCTIONS`: a convolution or `F.linear`) to `layer`,
- each `F.batch_norm` call to `batch_norm`,
- `F.multi_head_attention_forward` into `multi_head_attention`, the same computation written
  with `F.linear`, so that its projections are layer calls too,
- the gated activations (`GATED`: hard-swish, SiLU) into their parts, `x * gate(x)`, the way
  torch's exporter writes SiLU and onnxruntime runs HardSwish: the gate is a tensor of its own,
  which a fully quantized graph quantizes (`fddaq.quant.sites`), so that the product runs as an
  integer kernel (QLinearMul),

and lets a `Dataflow` follow which tensors come from the model input and which from
parameters only (a weight computed from a parameter, like a weight-standardized conv's, is
still that parameter's layer)."""

from __future__ import annotations

import math
from collections.abc import Callable, MutableMapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

# Calls that make a layer when their weight comes from a parameter; the value is the layer's kind.
LAYER_FUNCTIONS: dict[Callable[..., Tensor], str] = {
    F.conv1d: "conv1d",
    F.conv2d: "conv2d",
    F.conv3d: "conv3d",
    F.conv_transpose1d: "conv_transpose1d",
    F.conv_transpose2d: "conv_transpose2d",
    F.conv_transpose3d: "conv_transpose3d",
    F.linear: "linear",
}


def channel_axis(kind: str) -> int:
    """The weight axis of a layer's output channels: 1 for transposed convolutions
    ([in, out / groups, *kernel]), else 0."""
    return 1 if kind.startswith("conv_transpose") else 0


def output_channel_dim(kind: str, ndim: int) -> int:
    """The dimension of a layer's output (`ndim` dimensions) that holds its output channels: the
    last for a linear layer, else 1."""
    return ndim - 1 if kind == "linear" else 1


def tensors(value: Any) -> list[Tensor]:
    """Every tensor inside a (nested) call argument or result."""
    return [leaf for leaf in tree_flatten(value)[0] if isinstance(leaf, Tensor)]


def layer_arguments(args: tuple[Any, ...], kwargs: dict[str, Any],
                    ) -> tuple[Tensor, Tensor, Tensor | None, tuple[Any, ...], dict[str, Any]]:
    """(input, weight, bias, other positional arguments, other keyword arguments) of a layer
    call: every function of LAYER_FUNCTIONS takes (input, weight, bias, ...)."""
    options = dict(kwargs)
    rest = list(args)
    values = []
    for name in ("input", "weight", "bias"):
        if rest:
            values.append(rest.pop(0))
        else:
            values.append(options.pop(name, None))
    return values[0], values[1], values[2], tuple(rest), options


def batch_norm_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of an `F.batch_norm` call by name, defaults filled in."""
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    defaults = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
    return {**defaults, **dict(zip(names, args)), **kwargs}


class Dataflow:
    """Which tensors of a forward pass come from the model input (activations) and which are
    computed from parameters and buffers alone (the names they come from)."""

    def __init__(self, model: nn.Module) -> None:
        self.named: dict[int, str] = {}
        for name, tensor in [*model.named_buffers(), *model.named_parameters()]:
            self.named.setdefault(id(tensor), name)
        self.activations: MutableMapping[Tensor, bool] = WeakIdKeyDictionary()
        self.derived: MutableMapping[Tensor, frozenset[str]] = WeakIdKeyDictionary()

    def mark_input(self, value: Any) -> None:
        for tensor in tensors(value):
            self.activations[tensor] = True

    def is_activation(self, tensor: Tensor) -> bool:
        return tensor in self.activations

    def sources(self, tensor: Tensor) -> frozenset[str] | None:
        """The parameters and buffers `tensor` is computed from, None when it is not computed
        from them alone."""
        name = self.named.get(id(tensor))
        if name is not None:
            return frozenset((name,))
        return self.derived.get(tensor)

    def update(self, inputs: list[Tensor], outputs: list[Tensor]) -> None:
        if any(self.is_activation(t) for t in inputs):
            for tensor in outputs:
                self.activations[tensor] = True
            return
        found = [s for s in map(self.sources, inputs) if s is not None]
        if found:
            union = frozenset().union(*found)
            for tensor in outputs:
                if id(tensor) not in self.named:
                    self.derived[tensor] = union


class Interceptor(TorchFunctionMode):
    """A torch function mode routing layer calls, batch norms and multi-head attention to
    overridable methods; `flow` (when given) follows the data through every call."""

    def __init__(self, flow: Dataflow | None = None) -> None:
        super().__init__()
        self.flow = flow

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward and decomposable_attention(*args, **kwargs):
            with self:  # the projections inside are layer calls of this mode
                return multi_head_attention(*args, **kwargs)
        if func in GATED:
            with self:  # the gate and the product are calls of this mode
                return gated(func, *args, **kwargs)
        kind = LAYER_FUNCTIONS.get(func)
        if kind is not None:
            out = self.layer(kind, func, args, kwargs)
        elif func is F.batch_norm:
            out = self.batch_norm(func, args, kwargs)
        else:
            out = func(*args, **kwargs)
        self.after(func, args, kwargs, out)
        return out

    def layer(self, kind: str, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return func(*args, **kwargs)

    def batch_norm(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return func(*args, **kwargs)

    def after(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        if self.flow is not None:
            self.flow.update(tensors((args, kwargs)), tensors(out))


# Gated activations: the function -> its gate (the activation is x * gate(x)).
GATED: dict[Callable[..., Any], Callable[..., Tensor]] = {F.hardswish: F.hardsigmoid, F.silu: torch.sigmoid}


def gated(func: Callable[..., Any], x: Tensor, inplace: bool = False) -> Tensor:
    """`func(x)` (a `GATED` activation) as x * gate(x). An in-place call returns the result as
    a new tensor and leaves `x` as it was (the modules that call them in place all use the
    result; writing it into `x` would break the gradient of the gate, which reads `x`)."""
    return x * GATED[func](x)


# ---------------------------------------------------------------- multi-head attention

def decomposable_attention(*args: Any, **kwargs: Any) -> bool:
    """Whether `multi_head_attention` computes this `F.multi_head_attention_forward` call:
    packed projections, no extra key/value biases, no zero attention, no static keys."""
    names = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias",
             "bias_k", "bias_v", "add_zero_attn")
    given = {**dict(zip(names, args)), **kwargs}
    return (
        given.get("in_proj_weight") is not None
        and given.get("bias_k") is None and given.get("bias_v") is None
        and not given.get("add_zero_attn", False)
        and not given.get("use_separate_proj_weight", False)
        and given.get("static_k") is None and given.get("static_v") is None
    )


def multi_head_attention(
    query: Tensor, key: Tensor, value: Tensor, embed_dim_to_check: int, num_heads: int,
    in_proj_weight: Tensor, in_proj_bias: Tensor | None, bias_k: None, bias_v: None, add_zero_attn: bool,
    dropout_p: float, out_proj_weight: Tensor, out_proj_bias: Tensor | None, training: bool = True,
    key_padding_mask: Tensor | None = None, need_weights: bool = True, attn_mask: Tensor | None = None,
    use_separate_proj_weight: bool = False, q_proj_weight: None = None, k_proj_weight: None = None,
    v_proj_weight: None = None, static_k: None = None, static_v: None = None,
    average_attn_weights: bool = True, is_causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """`F.multi_head_attention_forward` (the decomposable cases) with its projections as
    `F.linear` calls on `in_proj_weight` and `out_proj_weight`: inputs [L, N, E] or [L, E]."""
    batched = query.dim() == 3
    if not batched:
        query, key, value = (t.unsqueeze(1) for t in (query, key, value))
        key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
    length, batch, embed = query.shape
    heads, source = num_heads, key.shape[0]
    head_dim = embed // heads
    if query is key and key is value:  # self-attention: one projection of the one input
        q, k, v = F.linear(query, in_proj_weight, in_proj_bias).chunk(3, dim=-1)
    else:  # the packed projection of each input (one layer), the part each one needs
        q = F.linear(query, in_proj_weight, in_proj_bias).chunk(3, dim=-1)[0]
        k = F.linear(key, in_proj_weight, in_proj_bias).chunk(3, dim=-1)[1]
        v = F.linear(value, in_proj_weight, in_proj_bias).chunk(3, dim=-1)[2]
    q = q.reshape(length, batch * heads, head_dim).transpose(0, 1)
    k = k.reshape(source, batch * heads, head_dim).transpose(0, 1)
    v = v.reshape(source, batch * heads, head_dim).transpose(0, 1)
    scores = torch.bmm(q * (1.0 / math.sqrt(head_dim)), k.transpose(1, 2))
    mask = _attention_mask(attn_mask, key_padding_mask, is_causal, batch, heads, length, source, scores.dtype, scores.device)
    if mask is not None:
        scores = scores + mask
    weights = F.softmax(scores, dim=-1)
    if training and dropout_p > 0:
        weights = F.dropout(weights, p=dropout_p)
    out = torch.bmm(weights, v).transpose(0, 1).reshape(length * batch, embed)
    out = F.linear(out, out_proj_weight, out_proj_bias).view(length, batch, embed)
    averaged = None
    if need_weights:
        averaged = weights.view(batch, heads, length, source)
        averaged = averaged.mean(dim=1) if average_attn_weights else averaged
        averaged = averaged if batched else averaged.squeeze(0)
    return (out if batched else out.squeeze(1)), averaged


def _attention_mask(attn_mask: Tensor | None, key_padding_mask: Tensor | None, is_causal: bool, batch: int, heads: int,
                    length: int, source: int, dtype: torch.dtype, device: torch.device) -> Tensor | None:
    """The additive float mask [N * heads, L, S] of the given masks (None when there is none)."""

    def additive(mask: Tensor) -> Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    if attn_mask is None and is_causal:
        attn_mask = torch.ones(length, source, dtype=torch.bool, device=device).triu(1)
    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        mask = mask.unsqueeze(0) if mask.dim() == 2 else mask
    if key_padding_mask is not None:
        padding = additive(key_padding_mask).view(batch, 1, 1, source).expand(-1, heads, -1, -1)
        padding = padding.reshape(batch * heads, 1, source)
        mask = padding if mask is None else mask + padding
    return mask
