"""Error-compensated weight rounding (GPTQ, after OBQ): each layer's weights rounded one input
column at a time, the rounding error of each column spread over the columns not yet rounded so
that the layer's *output* on real inputs moves as little as possible.

Rounding each weight to its nearest grid point minimises the error of the weights; what matters
is the error of the output ``(W - Q) x``. With ``H = E[x x^T]`` over the layer's inputs (the
unfolded patches of a convolution, per group), the output error of one output channel is
``(w - q)^T H (w - q)``. GPTQ rounds the columns in turn (those with the largest input energy
first) and, after each, updates the remaining columns by the optimal least-squares
compensation through the Cholesky factor of ``H^-1``. It needs no training: one partial forward
per layer to collect ``H`` and a few small matrix products. Layer by layer in execution order,
each layer sees the inputs the quantized model gives it (its input quantizer on, the earlier
layers already rounded), so the error compensation also absorbs what came before.

The grid (per-channel step sizes and zero points) is the one calibration chose; only the
rounding changes, and it is written into the layer's weight parameter (on the grid, so
quantizing it again is exact), as block reconstruction writes its learned rounding. Layers
whose weight is not a parameter of their own (computed or shared weights), transposed and 3-D
convolutions, and layers with more than `MAX_INPUTS` inputs per output channel keep rounding to
nearest."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..device import model_device
from ..events import EventHandler, emit
from .intercept import layer_arguments
from .modules import QuantizedModel, QuantLayer, StopForward, forward_until_stopped
from .primitives import weight_range

DAMPING = 0.01  # fraction of the mean diagonal of H added to it (GPTQ's default)
UNFOLD_ELEMENTS = 1 << 25  # largest unfolded input block held at once (128 MiB of float32)
KINDS = ("linear", "conv1d", "conv2d")
MAX_INPUTS = 8192  # inputs per output channel beyond which H (inputs^2 doubles) is not built


def _conv_options(rest: tuple, options: dict, dims: int) -> tuple[tuple, tuple, tuple | str, int]:
    """(stride, dilation, padding, groups) of a convolution call, each spatial value a tuple of
    `dims` values (padding may be "same" or "valid")."""
    values = dict(zip(("stride", "padding", "dilation", "groups"), rest))
    values.update(options)

    def spatial(value: object) -> tuple:
        return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims

    padding = values.get("padding", 0)
    return (spatial(values.get("stride", 1)), spatial(values.get("dilation", 1)),
            padding if isinstance(padding, str) else spatial(padding), int(values.get("groups", 1)))


def _patches(x: Tensor, kernel: tuple[int, ...], kind: str, rest: tuple, options: dict) -> tuple[Tensor, int]:
    """The layer's inputs as columns, (groups, inputs per group, samples), and the group count:
    the rows of a linear's input, or the unfolded patches of a convolution's."""
    if kind == "linear":
        return x.reshape(-1, x.shape[-1]).t()[None], 1
    stride, dilation, padding, groups = _conv_options(rest, options, len(kernel))
    if kind == "conv1d":  # as a convolution of height 1
        x, kernel, stride, dilation = x.unsqueeze(-2), (1, *kernel), (1, *stride), (1, *dilation)
        padding = padding if isinstance(padding, str) else (0, *padding)
    if padding == "valid":
        padding = (0, 0)
    elif padding == "same":  # stride 1: the convolution pads (d (k - 1)) / 2, the extra one after
        total = [d * (k - 1) for d, k in zip(dilation, kernel)]
        x = F.pad(x, (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2))
        padding = (0, 0)
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (N, C x kernel, L)
    n, features, length = cols.shape
    return cols.view(n, groups, features // groups, length).permute(1, 2, 0, 3).reshape(groups, features // groups, -1), groups


class _Hessian:
    """Accumulates ``sum x x^T`` per group over a layer's (quantized) inputs."""

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.count = 0
        self.groups = 1

    def add(self, layer: QuantLayer, call_args: tuple, call_kwargs: dict) -> None:
        x, weight, _, rest, options = layer_arguments(call_args, call_kwargs)
        x = layer.input_quant(x.detach()).float()
        kernel = tuple(weight.shape[2:])
        step = max(1, UNFOLD_ELEMENTS // max(1, x[:1].numel() * math.prod(kernel)))
        for start in range(0, len(x), step):
            cols, self.groups = _patches(x[start : start + step], kernel, layer.kind, rest, options)
            gram = torch.bmm(cols, cols.transpose(1, 2)).double()
            self.total = gram if self.total is None else self.total + gram
            self.count += cols.shape[-1]


def _eligible(model: QuantizedModel) -> dict[str, nn.Parameter]:
    """The weight parameters GPTQ rounds, by layer name (see the module doc)."""
    eligible = {}
    for name, weight in model.own_weights().items():
        layer = model.quant_layer(name)
        if layer.enabled and layer.kind in KINDS and weight[0].numel() <= MAX_INPUTS:
            eligible[name] = weight
    return eligible


@torch.no_grad()
def _hessian(model: QuantizedModel, layer: QuantLayer, images: Tensor, batch_size: int) -> _Hessian | None:
    hessian = _Hessian()

    def probe(module: nn.Module, args: tuple) -> None:
        _, call_args, call_kwargs, _ = args
        hessian.add(layer, call_args, call_kwargs)
        raise StopForward

    handle = layer.register_forward_pre_hook(probe)
    try:
        forward_until_stopped(model, images, batch_size, model_device(model))
    finally:
        handle.remove()
    return hessian if hessian.total is not None else None


def gptq(weight: Tensor, hessian: Tensor, scale: Tensor, zero_point: Tensor, bits: int,
         damping: float = DAMPING) -> Tensor:
    """The on-grid weights GPTQ chooses. `weight`: (groups, rows, inputs); `hessian`: (groups,
    inputs, inputs), ``sum x x^T``; `scale`, `zero_point`: (groups, rows, 1). Columns are rounded
    in order of decreasing input energy, each group on its own."""
    qmin, qmax = weight_range(bits)
    w = weight.double().clone()
    h = hessian.double().clone()
    groups, rows, inputs = w.shape
    diag = torch.diagonal(h, dim1=1, dim2=2)
    dead = diag <= 0
    diag.masked_fill_(dead, 1.0)  # an input that was always 0: its weight rounds alone
    order = torch.argsort(diag, dim=1, descending=True)
    w = torch.gather(w, 2, order[:, None, :].expand(groups, rows, inputs))
    h = torch.gather(torch.gather(h, 1, order[:, :, None].expand(groups, inputs, inputs)), 2,
                     order[:, None, :].expand(groups, inputs, inputs))
    eye = torch.eye(inputs, dtype=h.dtype)
    damp = damping * torch.diagonal(h, dim1=1, dim2=2).mean(dim=1)
    for attempt in range(6):
        factor, info = torch.linalg.cholesky_ex(h + (damp * 10.0**attempt)[:, None, None] * eye)
        if not info.any():
            break
    else:
        raise ValueError("the layer's input Gram matrix is not positive definite even after damping")
    upper = torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)
    s, zp = scale.double(), zero_point.double()
    q = torch.empty_like(w)
    for i in range(inputs):
        column = w[:, :, i : i + 1]
        rounded = (torch.clamp(torch.round(column / s) + zp, qmin, qmax) - zp) * s
        q[:, :, i : i + 1] = rounded
        error = (column - rounded) / upper[:, i, i][:, None, None]
        w[:, :, i + 1 :] -= error * upper[:, None, i, i + 1 :]
    return torch.empty_like(q).scatter_(2, order[:, None, :].expand(groups, rows, inputs), q)


@torch.no_grad()
def round_weights(model: QuantizedModel, images: Tensor, batch_size: int = 32,
                  on_event: EventHandler | None = None) -> int:
    """Round the weights of every eligible layer (see the module doc) by GPTQ on `images`, layer
    by layer in execution order; returns how many layers were rounded so."""
    if model.deployed:
        raise ValueError("weight rounding needs the fake-quant model before folding")
    eligible = _eligible(model)
    model.eval()
    emit(on_event, "round", 0, len(eligible))
    rounded = 0
    for index, (name, parameter) in enumerate(eligible.items(), 1):
        layer = model.quant_layer(name)
        hessian = _hessian(model, layer, images, batch_size)
        if hessian is not None:
            quant = layer.weight_quant
            groups = hessian.groups
            w = parameter.detach().reshape(groups, parameter.shape[0] // groups, -1)
            scale = quant.scale().detach().reshape(groups, -1, 1)
            zero_point = quant.zero_point.detach().reshape(groups, -1, 1)
            chosen = gptq(w.cpu(), hessian.total.cpu(), scale.cpu(), zero_point.cpu(), quant.bits)
            parameter.copy_(chosen.reshape(parameter.shape).to(parameter))
            rounded += 1
        emit(on_event, "round", index, len(eligible))
    return rounded
