"""The fake-quant model: the float model, unchanged, run under a function mode that quantizes
each planned layer's input, weight and bias where the layer is called.

`QuantizedModel` wraps the user's module tree as it is (no module is swapped, so model code
nobody here wrote keeps working) and owns one `QuantLayer` per quantized layer of the plan:
a per-channel weight quantizer and a per-tensor input quantizer. Its forward runs the model
under `_Quantizing`, which finds a layer call by its weight (the parameter itself, or the
parameters a computed weight comes from, as `capture` recorded them) and hands it to the
layer's `QuantLayer`. Once deployed (`fold.fold_batch_norms`), a `QuantLayer` holds its integer
weights and its bias (BatchNorm and bias correction folded in), and the folded BatchNorm calls
become the identity."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar, cast

import torch
from torch import Tensor, nn

from .capture import Capture, select_output
from .intercept import (
    Dataflow,
    Interceptor,
    batch_norm_arguments,
    channel_axis,
    layer_arguments,
    output_channel_dim,
)
from .primitives import (
    BIAS_SPAN,
    MIN_SCALE,
    activation_params,
    activation_range,
    fake_quant,
    mse_affine_weight_grid,
    mse_weight_scales,
    weight_grid,
    weight_range,
)
from .sites import CallPositions, keyed_op, layer_output

M = TypeVar("M", bound=nn.Module)


class Modules(nn.ModuleList, Generic[M]):
    """A ModuleList whose modules are all `M`: the same list at run time, typed for the checker."""

    def __iter__(self) -> Iterator[M]:
        return cast(Iterator[M], super().__iter__())


class WeightQuantizer(nn.Module):
    """Per-output-channel quantizer with a learnable log step size and a fixed integer zero
    point per channel: 0 on a symmetric grid, set by calibration on an affine one (`affine`:
    the layer plan's `weight_grid`)."""

    zero_point: Tensor

    def __init__(self, bits: int, channels: int, axis: int, affine: bool) -> None:
        super().__init__()
        self.bits = bits
        self.axis = axis  # the weight axis of the output channels
        self.affine = affine
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.register_buffer("zero_point", torch.zeros(channels))

    def range(self) -> tuple[int, int]:
        """The integer range of the stored weights (zero point included)."""
        return weight_range(self.bits, self.affine)

    def scale(self) -> Tensor:
        return self.log_scale.exp().clamp(min=MIN_SCALE)

    def set_scale(self, scale: Tensor) -> None:
        with torch.no_grad():
            self.log_scale.copy_(scale.clamp(min=MIN_SCALE).log())

    def set_grid(self, scale: Tensor, zero_point: Tensor | None = None) -> None:
        """Step sizes and (affine grid) zero points per channel."""
        self.set_scale(scale)
        if zero_point is not None:
            self.zero_point.copy_(zero_point)

    def set_min_max(self, weight: Tensor) -> None:
        """The range-from-weights grid: per channel max |w| / qmax (never 0), or the affine grid
        of each channel's [min, max]."""
        w = self.channels_first(weight.detach()).flatten(1)
        if self.affine:
            self.set_grid(*weight_grid(w.amin(dim=1), w.amax(dim=1), self.bits))
            return
        _, qmax = self.range()
        w_max = w.abs().amax(dim=1)
        self.set_scale(torch.where(w_max > 0, w_max / qmax, torch.ones_like(w_max)))

    def set_mse(self, weight: Tensor) -> None:
        """The grid minimising each channel's squared quantization error."""
        w = self.channels_first(weight)
        if self.affine:
            self.set_grid(*mse_affine_weight_grid(w, self.bits))
        else:
            self.set_scale(mse_weight_scales(w, self.bits))

    def negate(self, integers: Tensor, negative: Tensor) -> Tensor:
        """`integers` (as floats) with the channels where `negative` holds negated in value:
        ``-q`` on the symmetric grid, ``-1 - q`` with zero point ``-1 - zp`` on the affine one."""
        shape = self.channel_shape(integers)
        if not self.affine:
            return torch.where(negative.reshape(shape), -integers, integers)
        with torch.no_grad():
            self.zero_point.copy_(torch.where(negative, -1.0 - self.zero_point, self.zero_point))
        return torch.where(negative.reshape(shape), -1.0 - integers, integers)

    def channels_first(self, weight: Tensor) -> Tensor:
        """`weight` with its output-channel axis first."""
        return weight if self.axis == 0 else weight.movedim(self.axis, 0)

    def channel_shape(self, weight: Tensor) -> list[int]:
        """The shape that broadcasts per-channel values over `weight`."""
        shape = [1] * weight.dim()
        shape[self.axis] = -1
        return shape

    def _channel_scale(self, weight: Tensor) -> Tensor:
        return self.scale().reshape(self.channel_shape(weight))

    def channel_zero_point(self, weight: Tensor) -> Tensor | float:
        """The zero points shaped to broadcast over `weight` (the number 0 on the symmetric grid)."""
        return self.zero_point.reshape(self.channel_shape(weight)) if self.affine else 0.0

    def quantize(self, weight: Tensor) -> Tensor:
        """Stored integer values (as floats, within `weight_range`, zero point included), no gradient."""
        qmin, qmax = self.range()
        scaled = torch.round(weight.detach() / self._channel_scale(weight).detach())
        return torch.clamp(scaled + self.channel_zero_point(weight), qmin, qmax)

    def dequantize(self, integers: Tensor) -> Tensor:
        """``(integers - zero point) x step`` per channel."""
        return (integers - self.channel_zero_point(integers)) * self._channel_scale(integers)

    def forward(self, weight: Tensor) -> Tensor:
        qmin, qmax = self.range()
        return fake_quant(weight, self._channel_scale(weight), self.channel_zero_point(weight), qmin, qmax)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_channel, {'affine' if self.affine else 'symmetric'}, axis={self.axis}"


class ActivationQuantizer(nn.Module):
    """Asymmetric per-tensor quantizer: learnable log step size, integer zero point.

    Its state is its parameters and buffers: the step size, the zero point and `observed`, the
    observer's running (min, max) (the empty range (inf, -inf) before any). Two modes, set for a block by context
    managers, as `training` is by `train()`/`eval()`:
    - `enabled` (`switched_off`): when off, the identity (calibration observes float inputs);
    - `ema_momentum` (`observing`, e.g. 0.9): an observer, whose forward first moves the running
      min/max towards the batch's (EMA) and sets the grid from it (the official FDDA recipe).
    `bounds` (low, high): the input is clipped to that range (ReLU6, Hardtanh: `prepare` gives
    the model's clip): the step size is capped so that no grid point lies outside it. Such
    points could never be used, and onnxruntime removes the Clip, and so runs 8-bit integer
    kernels, only when the grid lies within it. `name`: the site (`sites.Site`) of a tensor
    quantizer (None for a layer's input quantizer)."""

    zero_point: Tensor
    observed: Tensor

    def __init__(self, bits: int, name: str | None = None, bounds: tuple[float, float] | None = None) -> None:
        super().__init__()
        self.bits = bits
        self.name = name
        self.bounds = bounds
        self.enabled = True
        self.ema_momentum: float | None = None
        self.log_scale = nn.Parameter(torch.zeros(()))
        self.register_buffer("zero_point", torch.zeros(()))
        self.register_buffer("observed", torch.tensor([math.inf, -math.inf], dtype=torch.float64))

    def scale(self) -> Tensor:
        scale = self.log_scale.exp()
        if self.bounds is not None:
            low, high = self.bounds
            qmin, qmax = activation_range(self.bits)
            margin = 1 - 2.0**-20  # float32 rounding of (q - zero_point) * scale stays inside
            if high > 0:
                scale = torch.minimum(scale, margin * high / (qmax - self.zero_point).clamp(min=1))
            if low < 0:
                scale = torch.minimum(scale, margin * low / (qmin - self.zero_point).clamp(max=-1))
        return scale.clamp(min=MIN_SCALE)

    def set_params(self, scale: float, zero_point: float) -> None:
        with torch.no_grad():
            self.log_scale.fill_(math.log(max(scale, MIN_SCALE)))
            self.zero_point.fill_(zero_point)

    def observed_range(self) -> tuple[float, float] | None:
        """The observer's running (min, max); None before any observation."""
        lo, hi = self.observed.tolist()
        return None if lo > hi else (lo, hi)

    def observe(self, x: Tensor) -> None:
        lo, hi = x.detach().min().item(), x.detach().max().item()
        before = self.observed_range()
        if before is not None:
            m = self.ema_momentum if self.ema_momentum is not None else 0.0
            lo, hi = m * before[0] + (1 - m) * lo, m * before[1] + (1 - m) * hi
        self.set_observed(lo, hi)

    def set_observed(self, lo: float, hi: float) -> None:
        """The observed range (lo, hi), and the grid that covers it."""
        self.observed.copy_(torch.tensor([lo, hi], dtype=torch.float64))
        self.set_params(*activation_params(lo, hi, self.bits))

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        if self.ema_momentum is not None:
            self.observe(x)
        qmin, qmax = activation_range(self.bits)
        return fake_quant(x, self.scale(), self.zero_point, qmin, qmax)

    def extra_repr(self) -> str:
        return f"{self.name!r}, " * (self.name is not None) + f"bits={self.bits}, per_tensor"


class QuantLayer(nn.Module):
    """The quantizers of one layer (a convolution or linear call, see `capture.Layer`), the
    `bias_shift` that bias correction adds to the bias each call passes (per output channel;
    None before `bias.correct_biases`) and, once deployed, its integer weights, and either its
    bias with a BatchNorm folded in (the shift too) or its shift (zeros if none: other layers
    keep the bias each call passes). Switched off (`switched_off`: `enabled` False), a layer
    that is not deployed is a float layer (the reference of the per-layer SQNR). A `tied` layer reads a quantized tensor
    as it is: its `input_quant` is that tensor's quantizer (`QuantizedModel.sites`), applied
    where the tensor is computed, not again here."""

    integers: Tensor | None
    deployed_bias: Tensor | None
    bias_shift: Tensor | None

    def __init__(self, name: str, kind: str, channels: int, weight_bits: int, act_bits: int, affine: bool,
                 input_bounds: tuple[float, float] | None = None) -> None:
        super().__init__()
        self.name = name
        self.kind = kind
        self.enabled = True
        self.weight_quant = WeightQuantizer(weight_bits, channels, channel_axis(kind), affine)
        self.input_quant = ActivationQuantizer(act_bits, bounds=input_bounds)
        self.tied = False
        self.register_buffer("integers", None)  # deployed: int8 weights (within the weight grid)
        self.register_buffer("deployed_bias", None)  # deployed with a BatchNorm folded in: float32 bias
        self.register_buffer("bias_shift", None)  # bias correction, added to the call's bias

    @property
    def deployed(self) -> bool:
        return self.integers is not None

    def bias_scale(self, bias: Tensor) -> Tensor:
        """Step of the int32 bias per output: input step x weight step (repeated over the groups
        of a grouped transposed convolution, whose weight scales cover one group)."""
        scale = self.input_quant.scale() * self.weight_quant.scale()
        return scale.repeat(bias.numel() // scale.numel()) if bias.numel() != scale.numel() else scale

    def quantized_bias(self, bias: Tensor | None) -> Tensor | None:
        """The bias as the int32 values integer kernels add, at step `bias_scale` (straight-through
        gradient to the bias). Unquantized while the input quantizer is off (calibration
        observes float inputs)."""
        if bias is None or not self.input_quant.enabled:
            return bias
        return fake_quant(bias, self.bias_scale(bias).detach(), 0.0, -BIAS_SPAN, BIAS_SPAN)

    @torch.no_grad()
    def bias_integers(self, bias: Tensor) -> tuple[Tensor, Tensor]:
        """The int32 values of `bias` that `quantized_bias` computes with, and their steps (what
        the exported graph stores)."""
        scale = self.bias_scale(bias)
        return torch.clamp(torch.round(bias / scale), -BIAS_SPAN, BIAS_SPAN).to(torch.int32), scale

    def shifted_bias(self, bias: Tensor | None) -> Tensor | None:
        """The call's bias plus the bias correction (the correction alone without a bias)."""
        if self.bias_shift is None:
            return bias
        return self.bias_shift if bias is None else bias + self.bias_shift

    def deployed_weight(self) -> Tensor:
        assert self.integers is not None, "only a deployed layer has integer weights"
        return self.weight_quant.dequantize(self.integers.float())

    def forward(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                model: QuantizedModel) -> Any:
        x, weight, bias, rest, options = layer_arguments(args, kwargs)
        if model.recording is not None:  # what the model passes: no quantizer runs (nor observes)
            out = func(*args, **kwargs)
            if self.name not in model.recording:
                channels = out.shape[output_channel_dim(self.kind, out.dim())]
                model.recording[self.name] = (weight.detach(), out.new_zeros(channels) if bias is None else bias.detach())
            return out
        if self.enabled:
            quantized_x = x if self.tied else self.input_quant(x)
            quantized: tuple[Any, ...]
            if self.deployed:
                weight = cast(Tensor, self.integers)
                bias = self.shifted_bias(bias) if self.deployed_bias is None else self.deployed_bias
                quantized = (quantized_x, self.deployed_weight(), self.quantized_bias(bias))
            else:
                bias = self.shifted_bias(bias)
                quantized = (quantized_x, self.weight_quant(weight), self.quantized_bias(bias))
            if model.tap is not None:
                quantized = tuple(value if value is None else model.tap(self, role, cast(Tensor, raw), value)
                                  for role, raw, value in zip("xwb", (x, weight, bias), quantized))
            x, weight, bias = quantized
        out = func(x, weight, bias, *rest, **options)
        if model.outputs is not None and self.name not in model.outputs:
            model.outputs[self.name] = out.detach().clone()  # later in-place calls must not change it
        return out

    def extra_repr(self) -> str:
        return f"{self.name!r}, {self.kind}{', tied' if self.tied else ''}{', deployed' if self.deployed else ''}"


# (owner, role, raw, quantized) -> the value to use; the owner of role "y" is a site's quantizer
Tap = Callable[[QuantLayer | ActivationQuantizer, str, Tensor, Tensor], Tensor]


class QuantizedModel(nn.Module):
    """`model` (the float module tree, as it is) with the `QuantLayer`s of `layers` applied
    where those layers are called. `forward` returns the scored output (`output`, a name of
    `capture.outputs`; None: every output, as the exporter sets it); `forward_all` returns
    what the model returns.

    `sites`: the quantizers of the tensors between operators (`sites.Site`, by name), applied
    where each is computed.

    `tap(owner, role, raw, quantized)`, when set, sees every value a layer quantizes (`role`
    "x": its input, "w": its weight, "b": its bias; `owner` the layer) and every site's value
    (`role` "y", `owner` its quantizer) before and after quantization and returns the value
    to use: the exporter marks them, verification records and replaces them.
    `recording` and `outputs`, when set to a dict, receive each layer's first (weight, bias)
    arguments and its first output."""

    def __init__(self, model: nn.Module, capture: Capture, layers: list[QuantLayer], output: str,
                 sites: Iterable[ActivationQuantizer] = ()) -> None:
        super().__init__()
        self.model = model
        self.capture = capture
        self.layers: Modules[QuantLayer] = Modules(layers)
        self.sites: Modules[ActivationQuantizer] = Modules(sites)
        self.output: str | None = output
        self.tap: Tap | None = None
        self.recording: dict[str, tuple[Tensor, Tensor]] | None = None
        self.outputs: dict[str, Tensor] | None = None

    @property
    def deployed(self) -> bool:
        return any(layer.deployed for layer in self.layers)

    def quant_layer(self, name: str) -> QuantLayer:
        return next(layer for layer in self.layers if layer.name == name)

    def activation_quantizers(self) -> dict[str, ActivationQuantizer]:
        """Every activation quantizer once, by name: the input quantizer of each layer that is
        not tied (by the layer's name), then each site's (by the site's name)."""
        found = {layer.name: layer.input_quant for layer in self.layers if not layer.tied}
        found.update(self.named_sites())
        return found

    def named_sites(self) -> dict[str, ActivationQuantizer]:
        """Each site's quantizer, by the site's name."""
        found: dict[str, ActivationQuantizer] = {}
        for site in self.sites:
            assert site.name is not None, "a site's quantizer is named after its site (`prepare`)"
            found[site.name] = site
        return found

    def quantize_site(self, quant: ActivationQuantizer, value: Tensor) -> Tensor:
        """A site's value, quantized (through `tap`). Model code may go on in place
        (`out += identity`), and `fake_quant` keeps its output for the backward pass: under
        autograd the value handed on is a copy."""
        quantized = quant(value)
        quantized = quantized if self.tap is None else self.tap(quant, "y", value, quantized)
        return quantized.clone() if quantized.requires_grad else quantized

    def folded_batch_norms(self) -> list[str]:
        """Running-mean buffer names of the BatchNorms folded into deployed layers."""
        quantized = {layer.name for layer in self.layers if layer.deployed}
        return [fold.running_mean for fold in self.capture.folds if fold.layer in quantized]

    def forward(self, x: Tensor) -> Any:
        return select_output(self.forward_all(x), self.output)

    def forward_all(self, x: Tensor) -> Any:
        with _Quantizing(self, x):
            return self.model(x)

    def run_module(self, module: nn.Module, x: Tensor) -> Any:
        """`module` (a module of `model`) on `x`, its layers quantized."""
        with _Quantizing(self, x):
            return module(x)

    @torch.no_grad()
    def layer_tensors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """(weight, bias) each layer receives from the model at its first call (zeros for a call
        without a bias; one float forward on zeros, in eval mode: no statistic moves)."""
        training = {module: module.training for module in self.modules()}
        self.recording = {}
        try:
            example = torch.zeros(1, *self.capture.input_shape, device=next(self.parameters()).device)
            self.eval().forward_all(example)
            return self.recording
        finally:
            self.recording = None
            for module, mode in training.items():
                module.training = mode

    def layer_weights(self) -> dict[str, Tensor]:
        """Each layer's weight as the model passes it: the parameter itself when it is one
        (no forward: fine-tuning recipes read them every step)."""
        layers = {layer.name: layer for layer in self.capture.layers}
        direct = {name: layers[name].weight for name in (q.name for q in self.layers)}
        if all(direct.values()):
            return {name: self.model.get_parameter(weight) for name, weight in direct.items() if weight is not None}
        return {name: weight for name, (weight, _) in self.layer_tensors().items()}

    def trainable_weights(self) -> list[nn.Parameter]:
        """The parameters the quantized layers' weights and biases come from (not buffers, such
        as a pruning mask)."""
        parameters = dict(self.model.named_parameters())
        names: dict[str, None] = {}
        layers = {layer.name: layer for layer in self.capture.layers}
        for quant in self.layers:
            layer = layers[quant.name]
            names.update(dict.fromkeys(n for n in [*layer.sources, layer.bias] if n in parameters))
        return [parameters[name] for name in names]


class Selected(nn.Module):
    """A float model that returns its scored output (`output`, a name of its capture)."""

    def __init__(self, model: nn.Module, output: str) -> None:
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, x: Tensor) -> Tensor:
        return cast(Tensor, select_output(self.model(x), self.output))


class _Quantizing(Interceptor):
    """Hands each call of a quantized layer to its `QuantLayer` (found by the weight's
    parameter, or for a computed weight by the parameters it comes from), makes folded
    BatchNorms the identity and quantizes each site's value where it is computed (found by
    its name: `sites.CallPositions`)."""

    def __init__(self, qmodel: QuantizedModel, x: Tensor) -> None:
        model = qmodel.model
        parameters = dict(model.named_parameters())
        layers = {layer.name: layer for layer in qmodel.capture.layers}
        self.direct: dict[int, QuantLayer] = {}
        self.computed: dict[frozenset[str], QuantLayer] = {}
        for quant in qmodel.layers:
            layer = layers[quant.name]
            if layer.weight is not None:
                self.direct[id(parameters[layer.weight])] = quant
            else:
                self.computed[frozenset(layer.sources)] = quant
        flow = None
        if self.computed:
            flow = Dataflow(model)
            flow.mark_input(x)
        super().__init__(flow)
        self.qmodel = qmodel
        self.folded = {id(model.get_buffer(name)) for name in qmodel.folded_batch_norms()}
        self.sites = {site.name: site for site in qmodel.sites}
        self.positions = CallPositions(model) if self.sites else None
        self.layer_calls: dict[str, int] = {}
        self.tracking = contextlib.ExitStack()
        self.depth = 0  # the mode is entered again inside (multi-head attention): one tracking, outermost

    def __enter__(self) -> _Quantizing:
        if self.positions is not None and self.depth == 0:
            self.tracking.enter_context(self.positions.tracked())
        self.depth += 1
        return cast(_Quantizing, super().__enter__())  # type: ignore[no-untyped-call]  # torch's mode is untyped

    def __exit__(self, *exc_info: Any) -> None:
        try:
            super().__exit__(*exc_info)  # type: ignore[no-untyped-call]
        finally:
            self.depth -= 1
            if self.depth == 0:
                self.tracking.close()

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        out = super().__torch_function__(func, types, args, kwargs)
        op = keyed_op(func) if self.positions is not None else None
        if op is not None and self.positions is not None:
            quant = self.sites.get(self.positions.name(op)[0])
            if quant is not None and isinstance(out, Tensor) and self.qmodel.recording is None:
                out = self.qmodel.quantize_site(quant, out)
                if self.flow is not None:
                    self.flow.mark_input(out)
        return out

    def layer(self, kind: str, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        quant = self.direct.get(id(weight))
        if quant is None and self.flow is not None and isinstance(weight, Tensor):
            sources = self.flow.sources(weight)
            quant = None if sources is None else self.computed.get(sources)
        if quant is None:
            return func(*args, **kwargs)
        out = quant(func, args, kwargs, self.qmodel)
        if self.sites and self.qmodel.recording is None:
            call = self.layer_calls.get(quant.name, 0)
            self.layer_calls[quant.name] = call + 1
            site = self.sites.get(layer_output(quant.name, call))
            if site is not None:
                out = self.qmodel.quantize_site(site, out)
        return out

    def batch_norm(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        arguments = batch_norm_arguments(args, kwargs)
        if id(arguments["running_mean"]) in self.folded:
            return arguments["input"]
        return func(*args, **kwargs)


class StopForward(Exception):
    """Raised by a hook to end a forward once what it wanted has run."""


def forward_until_stopped(run: Callable[[Tensor], Any], images: Tensor, batch_size: int, device: torch.device) -> None:
    """`run` on `images` in batches of `batch_size` (moved to `device`), each forward ending
    where a hook raises `StopForward`."""
    for start in range(0, len(images), batch_size):
        try:
            run(images[start : start + batch_size].to(device))
        except StopForward:
            pass


def quant_layers(model: nn.Module) -> list[QuantLayer]:
    """The QuantLayers of a quantized model (also inside a wrapper such as DDP)."""
    return [m for m in model.modules() if isinstance(m, QuantLayer)]


def activation_quantizers(model: nn.Module) -> list[ActivationQuantizer]:
    """Every activation quantizer of a quantized model once (also inside a wrapper such as DDP):
    `QuantizedModel.activation_quantizers`."""
    qmodel = next(m for m in model.modules() if isinstance(m, QuantizedModel))
    return list(qmodel.activation_quantizers().values())


@contextlib.contextmanager
def _set_in_block(modules: Iterable[nn.Module], attribute: str, value: Any) -> Iterator[None]:
    """`attribute` of each of `modules` set to `value` inside the block; afterwards each is as
    it was (after an error too)."""
    modules = list(modules)
    before = [getattr(module, attribute) for module in modules]
    try:
        for module in modules:
            setattr(module, attribute, value)
        yield
    finally:
        for module, was in zip(modules, before):
            setattr(module, attribute, was)


def switched_off(modules: Iterable[QuantLayer | ActivationQuantizer]) -> contextlib.AbstractContextManager[None]:
    """Inside the block, each of `modules` off: a layer computes in float, a quantizer is the
    identity; afterwards each is as it was."""
    return _set_in_block(modules, "enabled", False)


def observing(quantizers: Iterable[ActivationQuantizer], momentum: float | None) -> contextlib.AbstractContextManager[None]:
    """Inside the block, each of `quantizers` an observer with EMA `momentum` (None: not one);
    afterwards each is as it was."""
    return _set_in_block(quantizers, "ema_momentum", momentum)
