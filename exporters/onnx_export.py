"""Export fake-quant (QDQ) and float models to ONNX by tracing them with `torch.fx` and emitting
the graph with `onnx.helper`.

`torch.onnx.export` cannot write 4-bit Q/DQ, so the graph is built here: every quantized layer
reads its input through QuantizeLinear -> DequantizeLinear, its weight from an INT4/INT8
initializer through a per-output-channel DequantizeLinear and its bias from an INT32 initializer
(step input scale x weight scale). The model is exported in its folded form
(`fddaq.quant.fold.fold_batch_norms`: BatchNorm folded into the preceding convolution's weight
scales and bias), the form PyTorch evaluates too.

Tensors of a layer are named after its module, tersely (names are a sizeable share of a 4-bit
file): `conv.x_q` -> `conv.x` is its quantized then dequantized input (`conv.x_scale`, one
shared `zero_point_uint4_0`-style zero point per value), `conv.w_q` -> `conv.w` its weight
(`conv.w_scale`), `conv.b_q` -> `conv.b` its bias (`conv.b_scale`), `conv` its output. Only
compute nodes carry a name (their output's); Q/DQ nodes are left unnamed.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import ml_dtypes
import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torchvision.ops import stochastic_depth

from fddaq import __version__
from fddaq.errors import ExportError, first_line
from fddaq.quant.fold import fold_batch_norms, module_calls, trace
from fddaq.quant.modules import FAKE_QUANT_LAYERS, FakeQuantConv2d, FakeQuantLinear
from fddaq.quant.primitives import BIAS_SPAN, activation_range

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_DIM = "N"
MIN_OPSET = 21  # INT4/UINT4 tensors and Q/DQ
CONVS = (nn.Conv2d, FakeQuantConv2d)


def layer_input(layer: str) -> str:
    """The tensor holding the dequantized input of the quantized layer (module) `layer`."""
    return f"{layer}.x"


def export_qdq(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    metadata: dict[str, str] | None = None,
    opset: int = 21,
) -> onnx.ModelProto:
    """The QDQ graph of a fake-quant `model` for inputs [N, *input_shape] (N dynamic).

    Quantized weights are stored only as INT4 (bits <= 4) or INT8 initializers."""
    if not any(isinstance(m, FAKE_QUANT_LAYERS) for m in model.modules()):
        raise ExportError(f"{type(model).__name__} has no fake-quant layers: use export_float for a float model")
    return _export(model, input_shape, metadata, opset, quantize=True)


def export_float(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    metadata: dict[str, str] | None = None,
    opset: int = 21,
) -> onnx.ModelProto:
    """The float graph of `model` (BatchNorm folded; fake-quant layers export their float weights)."""
    return _export(model, input_shape, metadata, opset, quantize=False)


def _export(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    metadata: dict[str, str] | None,
    opset: int,
    quantize: bool,
) -> onnx.ModelProto:
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise ExportError(
            f"opset={opset} is not supported: use {MIN_OPSET} (INT4/UINT4 Q/DQ) to {newest} (installed onnx {onnx.__version__})"
        )
    model = fold_batch_norms(model).cpu().float()  # a copy
    module = _trace(model)
    with torch.no_grad():
        try:
            ShapeProp(module).propagate(torch.zeros(1, *input_shape))
        except Exception as error:  # any failure of the user's forward on this shape
            raise ExportError(
                f"{type(model).__name__} does not run on input shape {tuple(input_shape)}: {first_line(error)}"
            ) from error
    graph = _GraphBuilder(module, quantize).build(tuple(input_shape))
    onnx_model = helper.make_model_gen_version(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name="fddaq",
        producer_version=__version__,
    )
    helper.set_model_props(onnx_model, metadata or {})
    try:
        onnx.checker.check_model(onnx_model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise ExportError(f"the exported graph is not valid ONNX: {first_line(error)}") from error
    return onnx_model


def conv_pads(conv: nn.Conv2d) -> list[int]:
    """A convolution's own zero padding as ONNX `pads`: [top, left, bottom, right]."""
    if conv.padding == "valid":
        return [0, 0, 0, 0]
    if conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(_pair(conv.dilation), _pair(conv.kernel_size))]
        begin = [t // 2 for t in total]
        return [*begin, *(t - b for t, b in zip(total, begin))]
    return [*_pair(conv.padding), *_pair(conv.padding)]


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return trace(model)
    except Exception as error:  # fx raises many types (TraceError, TypeError, ...)
        raise ExportError(f"torch.fx cannot trace {type(model).__name__}: {first_line(error)}") from error


def _pair(value: Any) -> tuple[Any, Any]:
    return (value, value) if isinstance(value, int) else (value[0], value[1])


def _argument(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """A call's argument, given by position or by keyword."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().double().numpy()


def _batch_norm_params(bn: nn.BatchNorm2d, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(gamma, beta, running_mean, running_var) in float64."""
    if bn.running_mean is None or bn.running_var is None:
        raise ExportError(f"cannot export module '{name}' (BatchNorm2d): it has no running statistics")
    mean, var = _numpy(bn.running_mean), _numpy(bn.running_var)
    gamma = _numpy(bn.weight) if bn.weight is not None else np.ones_like(mean)
    beta = _numpy(bn.bias) if bn.bias is not None else np.zeros_like(mean)
    return gamma, beta, mean, var


class _GraphBuilder:
    """Walks the traced graph once, emitting ONNX nodes and initializers for each fx node."""

    def __init__(self, module: fx.GraphModule, quantize: bool) -> None:
        self.module = module
        self.quantize = quantize
        self.modules = dict(module.named_modules())
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.zero_points: dict[tuple[str, int], str] = {}  # (storage type, value) -> shared initializer
        self.names: dict[fx.Node, str] = {}  # fx node -> ONNX tensor name
        self.batch_sizes: set[fx.Node] = set()  # `x.size(0)` nodes, only valid inside view/reshape
        self.calls = module_calls(module.graph)
        self.folded_pads: dict[fx.Node, list[int]] = {}  # conv -> zero padding folded into it
        relu = lambda node: self._unary(node, "Relu")  # noqa: E731
        hardswish = lambda node, *_: self._unary(node, "HardSwish")  # noqa: E731
        hardsigmoid = lambda node, *_: self._unary(node, "HardSigmoid", alpha=1.0 / 6, beta=0.5)  # noqa: E731
        sigmoid = lambda node, *_: self._unary(node, "Sigmoid")  # noqa: E731
        silu = lambda node, *_: self._silu(node)  # noqa: E731
        add = lambda node: self._binary(node, "Add")  # noqa: E731
        mul = lambda node: self._binary(node, "Mul")  # noqa: E731
        self.module_handlers: dict[type[nn.Module], Callable[[fx.Node, Any], None]] = {
            nn.Conv2d: self._conv,
            FakeQuantConv2d: self._conv,
            nn.Linear: self._linear,
            FakeQuantLinear: self._linear,
            nn.BatchNorm2d: self._batch_norm,
            nn.ReLU: lambda node, module: relu(node),
            nn.ReLU6: self._clip,
            nn.Hardtanh: self._clip,
            nn.Hardswish: hardswish,
            nn.Hardsigmoid: hardsigmoid,
            nn.Sigmoid: sigmoid,
            nn.SiLU: silu,
            nn.AdaptiveAvgPool2d: lambda node, pool: self._global_average_pool(node, pool.output_size),
            nn.AvgPool2d: self._average_pool,
            nn.MaxPool2d: self._max_pool,
            nn.Flatten: self._flatten_module,
            nn.Identity: self._pass_through,
            nn.Dropout: self._pass_through,
            nn.Dropout2d: self._pass_through,
            nn.ZeroPad2d: lambda node, pad: self._pad(node, pad.padding, 0.0),
            nn.ConstantPad2d: lambda node, pad: self._pad(node, pad.padding, pad.value),
        }
        self.function_handlers: dict[Any, Callable[[fx.Node], None]] = {
            operator.add: add,
            torch.add: add,
            operator.mul: mul,
            torch.mul: mul,
            F.hardswish: hardswish,
            F.hardsigmoid: hardsigmoid,
            torch.sigmoid: sigmoid,
            F.silu: silu,
            stochastic_depth: self._stochastic_depth,
            torch.relu: relu,
            F.relu: relu,
            torch.flatten: self._flatten_call,
            F.adaptive_avg_pool2d: lambda node: self._global_average_pool(node, _argument(node, 1, "output_size")),
            F.pad: self._pad_call,
            F.relu6: lambda node: self._clip_values(node, 0.0, 6.0),
            F.hardtanh: lambda node: self._clip_values(
                node, _argument(node, 1, "min_val", -1.0), _argument(node, 2, "max_val", 1.0)
            ),
        }
        self.method_handlers: dict[str, Callable[[fx.Node], None]] = {
            "add": add,
            "mul": mul,
            "sigmoid": sigmoid,
            "relu": relu,
            "flatten": self._flatten_call,
            "view": self._view,
            "reshape": self._view,
            "size": self._size,
        }

    # ---------------------------------------------------------------- graph walk

    def build(self, input_shape: tuple[int, ...]) -> onnx.GraphProto:
        placeholders = [n for n in self.module.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise ExportError(f"the model's forward must take one input tensor, not {len(placeholders)}")
        output = None
        for node in self.module.graph.nodes:
            if node.op == "placeholder":
                self.names[node] = INPUT_NAME
            elif node.op == "call_module":
                module = self.modules[node.target]
                handler = self.module_handlers.get(type(module))
                if handler is None:
                    raise ExportError(f"cannot export {self._describe(node)}: unsupported layer type")
                handler(node, module)
            elif node.op == "call_function" and node.target in self.function_handlers:
                self.function_handlers[node.target](node)
            elif node.op == "call_method" and node.target in self.method_handlers:
                self.method_handlers[node.target](node)
            elif node.op == "output":
                output = node.args[0]
            else:
                raise ExportError(f"cannot export {self._describe(node)}: unsupported operation")
        if not isinstance(output, fx.Node):
            raise ExportError("the model's forward must return one tensor")
        self._rename(self._tensor(output, output), OUTPUT_NAME)
        dims: list[str | int] = [BATCH_DIM, *input_shape]
        inputs = [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, dims)]
        out_dims = [BATCH_DIM, *output.meta["tensor_meta"].shape[1:]]
        outputs = [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, out_dims)]
        return helper.make_graph(self.nodes, "fddaq", inputs, outputs, self.initializers)

    def _rename(self, old: str, new: str) -> None:
        """Give the graph output its public name (an Identity when it is the graph input)."""
        if old == INPUT_NAME:
            self.nodes.append(helper.make_node("Identity", [old], [new], name=new))
            return
        for node in self.nodes:
            node.input[:] = [new if name == old else name for name in node.input]
            node.output[:] = [new if name == old else name for name in node.output]

    def _prefix(self, node: fx.Node) -> str:
        """Tensor names of a node: its module's name when the module is called once."""
        if node.op == "call_module" and self.calls[node.target] == 1:
            return node.target
        return node.name

    def _describe(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"module '{node.target}' ({type(self.modules[node.target]).__name__})"
        if node.op == "call_function":
            return f"function {getattr(node.target, '__name__', node.target)} (node '{node.name}')"
        if node.op == "call_method":
            return f"method .{node.target}() (node '{node.name}')"
        return f"{node.op} '{node.target}' (node '{node.name}')"

    def _tensor(self, arg: Any, user: fx.Node) -> str:
        if not isinstance(arg, fx.Node) or arg not in self.names:
            raise ExportError(f"cannot export {self._describe(user)}: argument {arg!r} is not a tensor")
        return self.names[arg]

    # ---------------------------------------------------------------- emission helpers

    def _emit(self, op: str, inputs: list[str], output: str, **attributes: Any) -> str:
        name = None if op in ("QuantizeLinear", "DequantizeLinear") else output
        self.nodes.append(helper.make_node(op, inputs, [output], name=name, **attributes))
        return output

    def _constant(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def _unary(self, node: fx.Node, op: str, **attributes: Any) -> None:
        self.names[node] = self._emit(op, [self._tensor(node.args[0], node)], node.name, **attributes)

    def _pass_through(self, node: fx.Node, module: nn.Module) -> None:
        self.names[node] = self._tensor(node.args[0], node)

    # ---------------------------------------------------------------- weighted layers

    def _quantized_input(self, x: str, layer: FakeQuantConv2d | FakeQuantLinear, prefix: str) -> str:
        """x -> [Max -> Min] -> QuantizeLinear -> DequantizeLinear with the layer's input quantizer."""
        quant = layer.input_quant
        if not (self.quantize and quant.enabled):
            return x
        qmin, qmax = activation_range(quant.bits)
        scale = np.float32(quant.scale().item())
        zero_point = int(quant.zero_point.item())
        storage = ml_dtypes.uint4 if quant.bits <= 4 else np.uint8
        if quant.bits not in (4, 8):
            # QuantizeLinear saturates only to the storage type's range: clamp to the grid's.
            # Max/Min, not Clip: onnxruntime's ClipQuantFusion (basic optimizations, on by
            # default) fails at session creation on Clip -> QuantizeLinear with a UINT4 zero point.
            low = self._constant(f"{prefix}.x_min", np.float32(qmin - zero_point) * scale)
            high = self._constant(f"{prefix}.x_max", np.float32(qmax - zero_point) * scale)
            x = self._emit("Max", [x, low], f"{prefix}.x_above_min")
            x = self._emit("Min", [x, high], f"{prefix}.x_clamped")
        key = (np.dtype(storage).name, zero_point)
        if key not in self.zero_points:
            self.zero_points[key] = self._constant(f"zero_point_{key[0]}_{zero_point}", np.array(zero_point, storage))
        q_params = [self._constant(f"{prefix}.x_scale", np.array(scale, np.float32)), self.zero_points[key]]
        quantized = self._emit("QuantizeLinear", [x, *q_params], f"{prefix}.x_q")
        return self._emit("DequantizeLinear", [quantized, *q_params], layer_input(prefix))

    def _weight_and_bias(self, layer: nn.Conv2d | nn.Linear, prefix: str) -> list[str]:
        """The layer's weight and bias: integers with a per-axis DequantizeLinear for a
        fake-quant layer (INT4/INT8 weights, INT32 bias), float initializers otherwise."""
        bias = None if layer.bias is None else layer.bias.detach().cpu().numpy().astype(np.float32)
        if not (self.quantize and isinstance(layer, FAKE_QUANT_LAYERS)):
            names = [self._constant(f"{prefix}.weight", layer.weight.detach().cpu().numpy().astype(np.float32))]
            return names if bias is None else [*names, self._constant(f"{prefix}.bias", bias)]
        quant = layer.weight_quant
        scale = quant.scale().detach().cpu().numpy().astype(np.float32)
        storage = ml_dtypes.int4 if quant.bits <= 4 else np.int8
        names = [self._dequantized(f"{prefix}.w", _numpy(quant.quantize(layer.weight)).astype(storage), scale)]
        if bias is None:
            return names
        if not layer.input_quant.enabled:
            return [*names, self._constant(f"{prefix}.bias", bias)]
        # the same float32 arithmetic as the fake-quant layer: step s_in * s_w, round half even
        bias_scale = np.float32(layer.input_quant.scale().item()) * scale
        integers = np.clip(np.round(bias / bias_scale), -BIAS_SPAN, BIAS_SPAN).astype(np.int32)
        return [*names, self._dequantized(f"{prefix}.b", integers, bias_scale)]

    def _dequantized(self, name: str, integers: np.ndarray, scale: np.ndarray) -> str:
        """Per-output-channel DequantizeLinear of `integers` (zero point 0: the default)."""
        inputs = [self._constant(f"{name}_q", integers), self._constant(f"{name}_scale", scale)]
        return self._emit("DequantizeLinear", inputs, name, axis=0)

    def _conv(self, node: fx.Node, conv: nn.Conv2d) -> None:
        if conv.padding_mode != "zeros":
            raise ExportError(f"cannot export {self._describe(node)}: padding_mode={conv.padding_mode!r} is not supported")
        prefix = self._prefix(node)
        x = self._tensor(node.args[0], node)
        if isinstance(conv, FakeQuantConv2d):
            x = self._quantized_input(x, conv, prefix)
        kernel = _pair(conv.kernel_size)
        dilation = _pair(conv.dilation)
        pads = [a + b for a, b in zip(conv_pads(conv), self.folded_pads.get(node, [0, 0, 0, 0]))]
        attributes: dict[str, Any] = {"kernel_shape": list(kernel), "strides": list(_pair(conv.stride)), "pads": pads}
        if dilation != (1, 1):  # the defaults are left out: every byte counts in a 4-bit file
            attributes["dilations"] = list(dilation)
        if conv.groups != 1:
            attributes["group"] = conv.groups
        self.names[node] = self._emit("Conv", [x, *self._weight_and_bias(conv, prefix)], prefix, **attributes)

    def _linear(self, node: fx.Node, linear: nn.Linear) -> None:
        rank = len(node.args[0].meta["tensor_meta"].shape)
        if rank != 2:
            raise ExportError(f"cannot export {self._describe(node)}: its input has rank {rank}, only [N, features] is supported")
        prefix = self._prefix(node)
        x = self._tensor(node.args[0], node)
        if isinstance(linear, FakeQuantLinear):
            x = self._quantized_input(x, linear, prefix)
        self.names[node] = self._emit("Gemm", [x, *self._weight_and_bias(linear, prefix)], prefix, transB=1)

    # ---------------------------------------------------------------- padding

    def _pad(self, node: fx.Node, padding: Any, value: float) -> None:
        """Constant padding of the last two dims, torch order (left, right, top, bottom). Zero
        padding read only by convolutions becomes their `pads` (exact: a quantizer maps 0 to
        its zero point, which dequantizes to 0); otherwise an ONNX Pad."""
        if isinstance(padding, int):
            padding = (padding,) * 4
        padding = [int(p) for p in padding] + [0] * (4 - len(padding))
        if len(padding) != 4:
            raise ExportError(f"cannot export {self._describe(node)}: only padding of the last two dims is supported")
        left, right, top, bottom = padding
        x = self._tensor(node.args[0], node)
        readers = list(node.users)
        if value == 0 and min(padding) >= 0 and readers and all(
            user.op == "call_module" and type(self.modules[user.target]) in CONVS and user.args[0] is node
            and self.modules[user.target].padding_mode == "zeros" for user in readers
        ):
            for user in readers:
                self.folded_pads[user] = [top, left, bottom, right]
            self.names[node] = x
            return
        rank = len(node.meta["tensor_meta"].shape)
        pads = self._constant(f"{node.name}.pads", np.array(
            [0] * (rank - 2) + [top, left] + [0] * (rank - 2) + [bottom, right], np.int64
        ))
        fill = self._constant(f"{node.name}.value", np.array(value, np.float32))
        self.names[node] = self._emit("Pad", [x, pads, fill], node.name, mode="constant")

    def _pad_call(self, node: fx.Node) -> None:
        """F.pad(x, pad, mode='constant', value=0)."""
        if _argument(node, 2, "mode", "constant") != "constant":
            raise ExportError(f"cannot export {self._describe(node)}: only constant padding is supported")
        value = _argument(node, 3, "value", None)
        self._pad(node, _argument(node, 1, "pad"), 0.0 if value is None else float(value))

    # ---------------------------------------------------------------- other layers

    def _batch_norm(self, node: fx.Node, bn: nn.BatchNorm2d) -> None:
        """A BatchNorm2d that cannot be folded (its input feeds other nodes too)."""
        params = [
            self._constant(f"{node.name}.{key}", value.astype(np.float32))
            for key, value in zip(("scale", "bias", "mean", "var"), _batch_norm_params(bn, node.target))
        ]
        x = self._tensor(node.args[0], node)
        self.names[node] = self._emit("BatchNormalization", [x, *params], node.name, epsilon=bn.eps)

    def _clip(self, node: fx.Node, module: nn.Hardtanh) -> None:
        self._clip_values(node, module.min_val, module.max_val)

    def _clip_values(self, node: fx.Node, low: float, high: float) -> None:
        """ReLU6 and Hardtanh: Clip(x, low, high), or Min(Max(x, low), high) when a reader
        quantizes to 4 bits or fewer: onnxruntime's ClipQuantFusion fails at session creation on
        Clip -> QuantizeLinear with a UINT4 zero point."""
        x = self._tensor(node.args[0], node)
        low = self._constant(f"{node.name}.min", np.array(low, np.float32))
        high = self._constant(f"{node.name}.max", np.array(high, np.float32))
        if any(self._reads_at_4_bits_or_fewer(user) for user in node.users):
            above = self._emit("Max", [x, low], f"{node.name}.above_min")
            self.names[node] = self._emit("Min", [above, high], node.name)
        else:
            self.names[node] = self._emit("Clip", [x, low, high], node.name)

    def _reads_at_4_bits_or_fewer(self, node: fx.Node) -> bool:
        """Whether `node` quantizes its input to 4 bits or fewer, directly or through padding
        and pass-through layers."""
        if not self.quantize:
            return False
        passes = node.op == "call_function" and node.target is F.pad
        if node.op == "call_module":
            module = self.modules[node.target]
            if isinstance(module, FAKE_QUANT_LAYERS):
                return module.input_quant.enabled and module.input_quant.bits <= 4
            passes = isinstance(module, (nn.ZeroPad2d, nn.ConstantPad2d, nn.Identity, nn.Dropout, nn.Dropout2d))
        return passes and any(self._reads_at_4_bits_or_fewer(user) for user in node.users)

    def _binary(self, node: fx.Node, op: str) -> None:
        """Add or Mul of two tensors (a residual sum, a squeeze-excite scale), or of a tensor and
        a number."""
        if node.kwargs.get("alpha", 1) != 1 or len(node.args) != 2 or not any(isinstance(a, fx.Node) for a in node.args):
            raise ExportError(f"cannot export {self._describe(node)}: only {op} of two tensors (or a tensor and a number) is supported")
        inputs = [
            self._constant(f"{node.name}.{i}", np.array(arg, np.float32)) if isinstance(arg, (int, float))
            else self._tensor(arg, node)
            for i, arg in enumerate(node.args)
        ]
        self.names[node] = self._emit(op, inputs, node.name)

    def _stochastic_depth(self, node: fx.Node) -> None:
        """torchvision's stochastic_depth(x, p, mode, training): the identity in eval mode."""
        if _argument(node, 3, "training", True):
            raise ExportError(f"cannot export {self._describe(node)}: the model is in training mode")
        self.names[node] = self._tensor(node.args[0], node)

    def _silu(self, node: fx.Node) -> None:
        """x * sigmoid(x) (ONNX has no SiLU before opset 24)."""
        x = self._tensor(node.args[0], node)
        gate = self._emit("Sigmoid", [x], f"{node.name}.sigmoid")
        self.names[node] = self._emit("Mul", [x, gate], node.name)

    def _global_average_pool(self, node: fx.Node, output_size: Any) -> None:
        if _pair(output_size) != (1, 1):
            raise ExportError(f"cannot export {self._describe(node)}: adaptive average pooling supports output_size 1 only")
        self._unary(node, "GlobalAveragePool")

    def _pool_attributes(self, node: fx.Node, pool: nn.AvgPool2d | nn.MaxPool2d) -> dict[str, Any]:
        if pool.ceil_mode:
            raise ExportError(f"cannot export {self._describe(node)}: ceil_mode=True is not supported")
        padding = _pair(pool.padding)
        stride = pool.stride if pool.stride is not None else pool.kernel_size
        return {"kernel_shape": list(_pair(pool.kernel_size)), "strides": list(_pair(stride)), "pads": [*padding, *padding]}

    def _average_pool(self, node: fx.Node, pool: nn.AvgPool2d) -> None:
        if pool.divisor_override is not None:
            raise ExportError(f"cannot export {self._describe(node)}: AvgPool2d divisor_override is not supported")
        attributes = self._pool_attributes(node, pool)
        self._unary(node, "AveragePool", count_include_pad=int(pool.count_include_pad), **attributes)

    def _max_pool(self, node: fx.Node, pool: nn.MaxPool2d) -> None:
        if pool.return_indices:
            raise ExportError(f"cannot export {self._describe(node)}: MaxPool2d return_indices is not supported")
        self._unary(node, "MaxPool", dilations=list(_pair(pool.dilation)), **self._pool_attributes(node, pool))

    # ---------------------------------------------------------------- flattening

    def _flatten(self, node: fx.Node, start_dim: int, end_dim: int) -> None:
        if (start_dim, end_dim) != (1, -1):
            raise ExportError(f"cannot export {self._describe(node)}: only flattening from dim 1 to the end is supported")
        self._unary(node, "Flatten", axis=1)

    def _flatten_module(self, node: fx.Node, module: nn.Flatten) -> None:
        self._flatten(node, module.start_dim, module.end_dim)

    def _flatten_call(self, node: fx.Node) -> None:
        """torch.flatten(x, start_dim=0, end_dim=-1) and x.flatten(...)."""
        self._flatten(node, _argument(node, 1, "start_dim", 0), _argument(node, 2, "end_dim", -1))

    def _size(self, node: fx.Node) -> None:
        """t.size(0): the batch size (of any tensor), usable only in x.view(t.size(0), -1)."""
        if node.args[1:] != (0,) or node.kwargs:
            raise ExportError(f"cannot export {self._describe(node)}: only x.size(0) is supported")
        self.batch_sizes.add(node)

    def _view(self, node: fx.Node) -> None:
        """x.view(t.size(0), -1) and x.reshape(...) of the same form: a flatten from dim 1."""
        x, *shape = node.args
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = list(shape[0])
        batch = shape[0] if shape else None
        if not (len(shape) == 2 and batch in self.batch_sizes and shape[1] == -1):
            raise ExportError(f"cannot export {self._describe(node)}: only x.{node.target}(x.size(0), -1) is supported")
        self._flatten(node, 1, -1)
