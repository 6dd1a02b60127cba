"""Export quantized and float models to ONNX: torch's exporter writes the graph, fddaq rewrites
its quantization markers into QuantizeLinear/DequantizeLinear with integer initializers.

Float operators are torch's job: `torch.onnx.export` (its TorchScript exporter, opset 20)
lowers whatever the model computes. fddaq owns the quantization: while exporting, every value
a quantized layer uses passes through `_Marker`, which computes nothing new and exports as one
`fddaq::Quant` node naming the layer and the role of the value. The rewrite then replaces

- an input marker by [Max -> Min ->] QuantizeLinear -> DequantizeLinear with the layer's
  input quantizer (UINT4 for 4 bits or fewer, else UINT8; the clamp to the grid below 8 bits,
  see `_Rewrite._quantized`), placed in front of the zero Pads feeding the layer
  (`_Rewrite._input`), or by nothing when the layer reads a tensor quantized before
  (`QuantLayer.tied`),
- a site marker (a tensor between operators, `fddaq.quant.sites`) likewise with the site's
  quantizer,
- a weight marker by an INT4 (4 bits or fewer, with per-channel INT4 zero points: the affine
  grid) or INT8 initializer (symmetric) with a per-output-channel DequantizeLinear (the float
  weight and whatever computed it become dead and are removed),
- a bias marker by an INT32 initializer at step input scale x weight scale,

all from the quantizers' own float32 values, so the graph computes what PyTorch computes. A
site's values moved by a data-moving op get its Q/DQ again (`_Rewrite._requantize_moved`). The
model is exported in its deployed form (`fddaq.quant.fold.fold_batch_norms`).

Tensors of a layer are named after it, tersely (names are a sizeable share of a 4-bit file):
`conv.x` is its quantized then dequantized input (`conv.x_scale`, one shared
`zero_point_uint4_0`-style zero point per value; `conv.x1`, `conv.x2` for later calls of a
layer called several times), `conv.w` its weight (`conv.w_q`, `conv.w_scale`, `conv.w_zp`),
`conv.b` its
bias, `conv` its output; torch's generated names become short ones. Only the layers' compute
nodes keep a name."""

from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import sys
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Iterator, Set
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import Tensor, nn

from fddaq import __version__
from fddaq.errors import ExportError, first_line
from fddaq.quant.capture import output_leaves, short_location
from fddaq.quant.fold import fold_batch_norms
from fddaq.quant.modules import ActivationQuantizer, QuantizedModel, QuantLayer
from fddaq.quant.primitives import activation_range

INPUT_NAME = "input"
BATCH_DIM = "N"
MIN_OPSET = 21  # INT4/UINT4 tensors and Q/DQ
TORCH_OPSET = 20  # the newest opset torch's TorchScript exporter writes; the graph is stamped with the asked one
MARKER_DOMAIN = "fddaq"
# ops that only move the values of their first input (Resize: in "nearest" mode only), which
# runtimes run on integers between a DequantizeLinear and a QuantizeLinear of one grid
MOVING_OPS = {"MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Gather", "Expand", "Tile",
              "DepthToSpace", "SpaceToDepth", "Resize"}


def layer_input(layer: str, call: int = 0) -> str:
    """The tensor holding the dequantized input of layer `layer` (at its `call`-th call)."""
    return f"{layer}.x" if call == 0 else f"{layer}.x{call}"


def export_qdq(model: QuantizedModel, metadata: dict[str, str] | None = None, opset: int = 21,
               int8_weights: bool = False) -> onnx.ModelProto:
    """The QDQ graph of a quantized `model` for inputs [N, *model.capture.input_shape] (N
    dynamic), every output of the model an output of the graph. Quantized weights are stored
    only as INT4 (bits <= 4) or INT8 initializers; `int8_weights` stores 4-bit weights as INT8
    too (the same values: twice the weight bytes, and runtimes whose 8-bit kernels take them)."""
    _check_opset(opset)
    if not model.layers:
        raise ExportError("the model has no quantized layer: use export_float for a float model")
    model = fold_batch_norms(model).cpu().float()  # a copy, deployed
    model.output = None  # every output
    model.tap = lambda owner, role, raw, quantized: _Marker.apply(raw, quantized, f"{owner.name}|{role}")
    proto = _torch_export(model, model.capture.input_shape, prefix="model.")
    layers = {layer.name: layer for layer in model.layers}
    _Rewrite(proto.graph, layers, model.named_sites(), int8_weights).run()
    return _finish(proto, metadata, opset, set(layers))


def export_float(
    model: nn.Module, input_shape: tuple[int, ...], metadata: dict[str, str] | None = None, opset: int = 21
) -> onnx.ModelProto:
    """The float graph of `model` as torch exports it (BatchNorms folded by torch's exporter),
    every output of the model an output of the graph."""
    _check_opset(opset)
    return _finish(_torch_export(copy.deepcopy(model).cpu().float(), input_shape), metadata, opset)


def _check_opset(opset: int) -> None:
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise ExportError(
            f"opset={opset} is not supported: use {MIN_OPSET} (INT4/UINT4 Q/DQ) to {newest} (installed onnx {onnx.__version__})"
        )


# ---------------------------------------------------------------- torch's exporter

class _Marker(torch.autograd.Function):
    """A value a layer quantizes: computes `quantized`, exports as one `fddaq::Quant` node of
    `raw` keyed "layer|role" (how torch computed `quantized` is left dead in the graph)."""

    @staticmethod
    def forward(ctx: Any, raw: Tensor, quantized: Tensor, key: str) -> Tensor:
        return quantized.clone()

    @staticmethod
    def symbolic(g: Any, raw: Any, quantized: Any, key: str) -> Any:
        out = g.op(f"{MARKER_DOMAIN}::Quant", raw, key_s=key)
        out.setType(quantized.type())
        return out


def output_names(model: nn.Module, example: Tensor) -> list[str]:
    """Names of the model's outputs (see `fddaq.quant.capture.output_leaves`)."""
    with torch.no_grad():
        out = model.forward_all(example) if isinstance(model, QuantizedModel) else model(example)
    return [name for name, _ in output_leaves(out)]


def _torch_export(model: nn.Module, input_shape: tuple[int, ...], prefix: str = "") -> onnx.ModelProto:
    """`torch.onnx.export` of `model` (eval, CPU) with a dynamic batch dimension, as a proto; a
    failure is an ExportError naming the operator, the module (its path without `prefix`) and
    the source line."""
    model = model.eval()
    example = torch.zeros(1, *input_shape)
    names = output_names(model, example)
    axes = {name: {0: BATCH_DIM} for name in [INPUT_NAME, *names]}
    buffer = io.BytesIO()
    with _output_captured() as log, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notes, tracer hints
        try:
            torch.onnx.export(
                model, (example,), buffer,  # type: ignore[arg-type]  # typed as a path; it writes to files too
                dynamo=False, opset_version=TORCH_OPSET, input_names=[INPUT_NAME],
                output_names=names, dynamic_axes=axes, do_constant_folding=True,
                custom_opsets={MARKER_DOMAIN: 1},
            )
        except Exception as error:  # torch raises many types (UnsupportedOperatorError, SymbolicValueError, ...)
            raise ExportError(_export_failure(error, log.text(), prefix)) from error
    return onnx.load_from_string(buffer.getvalue())


class _Log:
    def __init__(self, path: str) -> None:
        self.path = path

    def text(self) -> str:
        with open(self.path, errors="replace") as handle:
            return handle.read()


@contextlib.contextmanager
def _output_captured() -> Iterator[_Log]:
    """Collect what is written to file descriptors 1 and 2 (torch's exporter logs the graph it
    was converting there, from C++, when it fails) instead of printing it."""
    with tempfile.NamedTemporaryFile(mode="w+", suffix=".log", delete=False) as handle:
        path = handle.name
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(path, "w") as target:
            os.dup2(target.fileno(), 1)
            os.dup2(target.fileno(), 2)
            try:
                yield _Log(path)
            finally:
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for descriptor in saved:
            os.close(descriptor)
        os.unlink(path)


def _export_failure(error: BaseException, log: str, prefix: str) -> str:
    """One line: what torch's exporter could not export, where it is and what torch said. Torch
    names the operator in its message and logs the graph it was converting, each node with its
    module scope and source line."""
    message = first_line(error)
    op = None
    for pattern, prefix_op in ((r"operator '([\w:]+)'", ""), (r"export of operator (\w+)", "aten::"),
                               (r"kind '([\w:]+)'", "")):
        found = re.search(pattern, str(error))
        if found:
            op = prefix_op + found.group(1)
            break
    where = ""
    for line in log.splitlines():
        node = re.search(r"= ([\w:]+)\(", line)
        if node is None or (op is not None and node.group(1) != op):
            continue
        scope = re.search(r"scope: (\S+)", line)
        where = _describe_scope(scope.group(1) if scope else None, prefix)
        source = re.search(r" # (\S+):(\d+):\d+\s*$", line)
        if source:
            where += f" at {short_location(source.group(1), int(source.group(2)))}"
        break
    subject = f"{op} in {where}" if op and where else op or where or "the model"
    return f"cannot export {subject}: {message}"


def _describe_scope(scope: str | None, prefix: str) -> str:
    """`module 'blocks.0.attn' (Attention)` from a TorchScript scope `a.B::/c.D::blocks.0.attn`."""
    if not scope:
        return "the model"
    last = scope.rstrip("/").split("/")[-1]
    class_path, _, name = last.rpartition("::")
    name = name[len(prefix):] if name.startswith(prefix) else name
    return f"module '{name}' ({class_path.rpartition('.')[2]})" if name and name != prefix.rstrip(".") else "the model"


# ---------------------------------------------------------------- the rewrite

class _Rewrite:
    """Replaces the `fddaq::Quant` markers of a graph torch exported (see the module doc)."""

    def __init__(self, graph: onnx.GraphProto, layers: dict[str, QuantLayer], sites: dict[str, ActivationQuantizer],
                 int8_weights: bool = False) -> None:
        self.graph = graph
        self.layers = layers
        self.sites = sites
        self.int8_weights = int8_weights
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.zero_points: dict[tuple[str, float], str] = {}  # shared scalars: zero points and clamp bounds
        self.renames: dict[str, str] = {}
        self.calls: dict[str, int] = defaultdict(int)
        self.emitted: dict[str, str] = {}  # what an initializer was made from (per layer) -> the tensor made
        self.values = {init.name: init for init in graph.initializer}
        self.values.update({node.output[0]: node.attribute[0].t for node in graph.node
                            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value"})
        self.aliases = {node.output[0]: node.input[0] for node in graph.node if node.op_type == "Identity"}
        self.readers: dict[str, int] = defaultdict(int)
        for node in graph.node:
            for name in node.input:
                self.readers[name] += 1
        self.producers: dict[str, onnx.NodeProto] = {}
        self.grids: dict[str, list[str]] = {}  # a value on an 8-bit site's grid -> that grid's scale and zero point

    def run(self) -> None:
        for node in self.graph.node:
            if node.domain != MARKER_DOMAIN:
                self.nodes.append(node)
                self.producers.update((output, node) for output in node.output)
                continue
            name, role = helper.get_attribute_value(node.attribute[0]).decode().rsplit("|", 1)
            raw = self.renames.get(node.input[0], node.input[0])  # a marker's output is renamed at once
            if role == "y":  # a site: quantized where it is computed
                self.renames[node.output[0]] = self._quantized(raw, self.sites[name], name)
                continue
            layer = self.layers[name]
            if role == "w":
                self.renames[node.output[0]] = self._weight(layer)
            elif not layer.input_quant.enabled or (role == "x" and layer.tied):  # float, or quantized before
                self.renames[node.output[0]] = raw
            elif role == "x":
                call = self.calls[name]
                self.calls[name] += 1
                self.renames[node.output[0]] = self._input(raw, layer.input_quant, layer_input(name, call))
            else:
                self.renames[node.output[0]] = self._bias(layer, raw)
        del self.graph.node[:]
        self.graph.node.extend(self.nodes)
        self.graph.initializer.extend(self.initializers)
        _rename(self.graph, self.renames)
        self._requantize_moved()

    def _requantize_moved(self) -> None:
        """A site's values that a data-moving op moves (MaxPool, Flatten, Reshape, ...) get the
        site's Q/DQ again, for every reader. It changes no value (they are on the grid already)
        and gives runtimes the DQ -> op -> Q they run on integers: a classifier after a Flatten
        becomes a QGemm, a residual add reading a MaxPool a QLinearAdd. (Zero Pads are left to
        the Conv they feed, which takes them in.)"""
        nodes: list[onnx.NodeProto] = []
        renames: dict[str, str] = {}
        outputs = {output.name for output in self.graph.output}
        for node in self.graph.node:
            node.input[:] = [renames.get(name, name) for name in node.input]
            nodes.append(node)
            moved = node.output[0] if node.output else ""
            if (node.op_type not in MOVING_OPS or not node.input or node.input[0] not in self.grids
                    or len(node.output) != 1 or moved in outputs or _attribute(node, "mode", b"nearest") != b"nearest"):
                continue
            grid = self.grids[node.input[0]]
            nodes.append(helper.make_node("QuantizeLinear", [moved, *grid], [f"{moved}_q"]))
            nodes.append(helper.make_node("DequantizeLinear", [f"{moved}_q", *grid], [f"{moved}_dq"]))
            self.grids[f"{moved}_dq"] = grid
            renames[moved] = f"{moved}_dq"
        del self.graph.node[:]
        self.graph.node.extend(nodes)

    def _input(self, raw: str, quant: ActivationQuantizer, name: str) -> str:
        """A layer's input `raw` quantized in front of the zero Pads that feed the layer (TF "same"
        padding, a stem's padding): the same values, since zero is on every grid, and
        onnxruntime then folds the Pads into the Conv's pads and runs a QLinearConv."""
        pads, value = [], raw
        while (pad := self._zero_pad(value)) is not None:
            pads.append(pad)
            value = pad.input[0]
        if not pads:
            return self._quantized(raw, quant, name)
        for pad in pads:  # after the new Q/DQ, in order
            self.nodes.remove(pad)
        pads[-1].input[0] = self._quantized(value, quant, f"{name}_unpadded")
        pads[0].output[0] = name  # the layer's input as PyTorch quantizes it (`verify` compares it)
        self.nodes.extend(reversed(pads))
        return name

    def _zero_pad(self, value: str) -> onnx.NodeProto | None:
        """The constant-mode Pad with value 0 that computes `value` for one reader only, if any."""
        node = self.producers.get(value)
        if node is None or node.op_type != "Pad" or self.readers[value] != 1:
            return None
        mode = _attribute(node, "mode", b"constant")
        constant = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if mode != b"constant" or (constant is not None and (constant not in self.values or numpy_helper.to_array(
                self.values[constant]).any())):
            return None
        return node

    def _emit(self, op: str, inputs: list[str], output: str, **attributes: Any) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], **attributes))
        return output

    def _constant(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def _quantized(self, x: str, quant: ActivationQuantizer, name: str) -> str:
        """x -> [Max -> Min] -> QuantizeLinear -> DequantizeLinear with an activation quantizer."""
        qmin, qmax = activation_range(quant.bits)
        scale = np.float32(quant.scale().item())
        zero_point = int(quant.zero_point.item())
        storage = ml_dtypes.uint4 if quant.bits <= 4 else np.uint8
        if quant.bits < 8:
            # Clamp to the grid first: QuantizeLinear saturates only to the storage type's range,
            # wider than the grid below 8 bits (UINT4 saturates at the top of a 4-bit grid: a
            # lower bound is enough there). At 4 bits the clamp changes no value but keeps
            # onnxruntime's optimizer from two failures at session creation: Clip ->
            # QuantizeLinear with a UINT4 zero point (ClipQuantFusion), and MaxPool ->
            # QuantizeLinear (UINT4), whose Q/DQ it moves around the MaxPool and then drops,
            # leaving a MaxPool on UINT4. Max/Min, not Clip, for the first reason.
            x = self._emit("Max", [x, self._bound(np.float32(qmin - zero_point) * scale)], f"{name}_lo")
            if quant.bits != 4:
                x = self._emit("Min", [x, self._bound(np.float32(qmax - zero_point) * scale)], f"{name}_hi")
        key = (np.dtype(storage).name, zero_point)
        if key not in self.zero_points:
            self.zero_points[key] = self._constant(f"zero_point_{key[0]}_{zero_point}", np.array(zero_point, storage))
        q_params = [self._constant(f"{name}_scale", np.array(scale, np.float32)), self.zero_points[key]]
        quantized = self._emit("QuantizeLinear", [x, *q_params], f"{name}_q")
        if storage is np.uint8 or quant.name is None:
            if storage is np.uint8 and quant.name is not None:
                self.grids[name] = q_params
            return self._emit("DequantizeLinear", [quantized, *q_params], name)
        # A UINT4 site's values can reach a MaxPool (or Reshape, ...) next: onnxruntime would move
        # the DequantizeLinear past it and leave it on UINT4, which no kernel takes. A Max with
        # the grid's lowest value changes no value and stops that (4-bit activations have no
        # integer kernel to lose).
        dequantized = self._emit("DequantizeLinear", [quantized, *q_params], f"{name}_dq")
        return self._emit("Max", [dequantized, self._bound(np.float32(qmin - zero_point) * scale)], name)

    def _bound(self, value: np.float32) -> str:
        """A float32 scalar initializer, one per value (most lower bounds are 0)."""
        key = ("float32", float(value))
        if key not in self.zero_points:
            self.zero_points[key] = self._constant(f"bound_{len(self.zero_points)}", np.array(value, np.float32))
        return self.zero_points[key]

    def _weight(self, layer: QuantLayer) -> str:
        """INT4/INT8 initializer -> per-output-channel DequantizeLinear (once per layer)."""
        name = f"{layer.name}.w"
        if name not in self.emitted:
            self.emitted[name] = name
            quant = layer.weight_quant
            storage = ml_dtypes.int4 if quant.bits <= 4 and not self.int8_weights else np.int8
            scale = quant.scale().detach().cpu().numpy().astype(np.float32)
            zero_point = quant.zero_point.cpu().numpy().astype(storage) if quant.affine else None
            if zero_point is None and layer.kind == "linear" and storage is np.int8:  # QGemm needs B's zero point
                zero_point = np.zeros(scale.shape, storage)
            assert layer.integers is not None  # the exported model is deployed
            self._dequantized(name, layer.integers.cpu().numpy().astype(storage), scale, quant.axis, zero_point)
        return name

    def _bias(self, layer: QuantLayer, raw: str) -> str:
        """INT32 initializer at step input scale x weight scale -> DequantizeLinear, the same
        float32 arithmetic as the PyTorch layer (round half to even), from the float bias the
        call passes (a constant of the graph: each call of a layer may pass its own)."""
        while raw in self.aliases:
            raw = self.aliases[raw]
        if raw not in self.values:
            raise ExportError(f"cannot export layer {layer.name!r}: its bias is computed from the input, and fddaq "
                              "quantizes constant biases")
        key = f"{layer.name}|{raw}"  # torch shares one initializer between equal biases (zeros): not their steps
        if key not in self.emitted:
            name = f"{layer.name}.b" + ("" if f"{layer.name}.b" not in self.emitted.values()
                                        else str(sum(v.startswith(f"{layer.name}.b") for v in self.emitted.values())))
            self.emitted[key] = name
            bias = torch.from_numpy(numpy_helper.to_array(self.values[raw]).astype(np.float32).reshape(-1))
            integers, scale = layer.bias_integers(bias.to(layer.weight_quant.log_scale.device))
            self._dequantized(name, integers.cpu().numpy(), scale.cpu().numpy(), 0)
        return self.emitted[key]

    def _dequantized(self, name: str, integers: np.ndarray, scale: np.ndarray, axis: int,
                     zero_point: np.ndarray | None = None) -> str:
        """Per-axis DequantizeLinear of `integers` (zero point 0, the default, unless given)."""
        inputs = [self._constant(f"{name}_q", integers), self._constant(f"{name}_scale", scale)]
        if zero_point is not None:
            inputs.append(self._constant(f"{name}_zp", zero_point))
        return self._emit("DequantizeLinear", inputs, name, axis=axis)


def _attribute(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _rename(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    """Point every use of a tensor in `renames` (inputs, graph outputs) at its new name."""
    if not renames:
        return
    for node in graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                _rename(attribute.g, renames)
    for output in graph.output:
        if output.name in renames:
            # a graph output keeps its public name: an Identity gives it
            graph.node.append(helper.make_node("Identity", [renames[output.name]], [output.name]))


# ---------------------------------------------------------------- tidying and stamping

def _finish(proto: onnx.ModelProto, metadata: dict[str, str] | None, opset: int,
            layers: Set[str] = frozenset()) -> onnx.ModelProto:
    """Tidy the graph (`layers`: the quantized layers' names), stamp the opset (torch writes 20;
    opset 21 adds the 4-bit types), fddaq's producer and metadata, and check it."""
    graph = proto.graph
    _explicit_same_padding(graph)
    _drop_identities(graph)
    _drop_default_attributes(graph)
    _drop_absent_trailing_inputs(graph)
    _prune(graph)
    _short_names(graph, layers)
    del proto.opset_import[:]
    proto.opset_import.extend([helper.make_opsetid("", opset)])
    proto.ir_version = helper.find_min_ir_version_for(list(proto.opset_import))
    proto.producer_name, proto.producer_version = "fddaq", __version__
    del proto.metadata_props[:]
    helper.set_model_props(proto, metadata or {})
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise ExportError(f"the exported graph is not valid ONNX: {first_line(error)}") from error
    return proto


def _explicit_same_padding(graph: onnx.GraphProto) -> None:
    """Conv auto_pad SAME_UPPER/SAME_LOWER (torch writes it for padding="same") as explicit pads:
    onnxruntime refuses the former with dilations. Torch allows "same" only at stride 1, where
    the pads do not depend on the input size."""
    for node in graph.node:
        attributes = {a.name: a for a in node.attribute}
        mode = attributes.get("auto_pad")
        if node.op_type != "Conv" or mode is None or mode.s not in (b"SAME_UPPER", b"SAME_LOWER"):
            continue
        kernel = list(attributes["kernel_shape"].ints)
        strides = list(attributes["strides"].ints) if "strides" in attributes else [1] * len(kernel)
        if any(s != 1 for s in strides):
            continue
        dilations = list(attributes["dilations"].ints) if "dilations" in attributes else [1] * len(kernel)
        total = [d * (k - 1) for d, k in zip(dilations, kernel)]
        small = [t // 2 for t in total]
        begin = small if mode.s == b"SAME_UPPER" else [t - b for t, b in zip(total, small)]
        pads = begin + [t - b for t, b in zip(total, begin)]
        kept = [a for a in node.attribute if a.name != "auto_pad"]
        del node.attribute[:]
        node.attribute.extend([*kept, helper.make_attribute("pads", pads)])


_DEFAULTS = {"dilations": 1, "strides": 1, "pads": 0, "group": 1}  # of Conv, ConvTranspose, pooling


def _drop_default_attributes(graph: onnx.GraphProto) -> None:
    """Leave out attributes equal to their default (every byte counts in a 4-bit file)."""

    def default(attribute: onnx.AttributeProto) -> bool:
        if attribute.name not in _DEFAULTS:
            return False
        if attribute.type == onnx.AttributeProto.INTS:
            values = list(attribute.ints)
        elif attribute.type == onnx.AttributeProto.INT:
            values = [attribute.i]
        else:
            return False
        return all(value == _DEFAULTS[attribute.name] for value in values)

    for node in graph.node:
        if node.op_type in ("Conv", "ConvTranspose", "MaxPool", "AveragePool"):
            kept = [a for a in node.attribute if not default(a)]
            del node.attribute[:]
            node.attribute.extend(kept)


def _drop_absent_trailing_inputs(graph: onnx.GraphProto) -> None:
    """Leave out trailing optional inputs given as "" (torch writes a Pad's absent constant
    value so, and onnxruntime then will not fold that Pad into the next Conv)."""
    for node in graph.node:
        while node.input and not node.input[-1]:
            del node.input[-1]


def _drop_identities(graph: onnx.GraphProto) -> None:
    """Remove Identity nodes (torch writes one per duplicate initializer) except those that give
    a graph output its name."""
    outputs = {output.name for output in graph.output}
    renames: dict[str, str] = {}
    kept: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type == "Identity" and node.output[0] not in outputs:
            renames[node.output[0]] = renames.get(node.input[0], node.input[0])
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    for node in graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]


def _prune(graph: onnx.GraphProto) -> None:
    """Remove nodes nothing reads (the float weights the markers replaced, and what computed
    them) and unused initializers."""
    needed = {output.name for output in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(node.input)
            needed.update(_subgraph_inputs(node))
    del graph.node[:]
    graph.node.extend(reversed(kept))
    used = [init for init in graph.initializer if init.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(used)


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    names = set()
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            for inner in attribute.g.node:
                names.update(inner.input)
    return names


def _short_names(graph: onnx.GraphProto, layers: Set[str]) -> None:
    """Torch's generated tensor names (`/blocks/blocks.0/conv/Conv_output_0`, `onnx::Conv_12`)
    become `t0`, `t1`, ...; parameter names lose the wrapper prefix `model.`; a layer's compute
    node and its output are named after the layer; other nodes lose their names. (Only
    parameters carry the wrapper prefix: fddaq's own names, such as a layer input `model.conv.x`
    of a user module called `model`, keep theirs.)"""
    public = {value.name for value in [*graph.input, *graph.output]}
    parameters = {init.name for init in graph.initializer}
    layer_of: dict[str, str] = {}  # a layer's compute output -> its name
    calls: dict[str, int] = defaultdict(int)
    weights = {f"{layer}.w": layer for layer in layers}
    for node in graph.node:
        layer = weights.get(node.input[1]) if len(node.input) > 1 else None
        if layer is not None and node.output[0] not in public:
            layer_of[node.output[0]] = layer if calls[layer] == 0 else f"{layer}.{calls[layer]}"
            calls[layer] += 1
    renames: dict[str, str] = {}

    def short(name: str) -> str:
        if name in public or not name:
            return name
        if name in layer_of:
            return layer_of[name]
        if name.startswith("/") or name.startswith("onnx::") or name.isdigit():
            renames.setdefault(name, f"t{len(renames)}")
            return renames[name]
        return name[len("model."):] if name in parameters and name.startswith("model.") else name

    for init in graph.initializer:
        init.name = short(init.name)
    for node in graph.node:
        node.input[:] = [short(name) for name in node.input]
        node.output[:] = [short(name) for name in node.output]
        node.name = node.output[0] if node.output[0] in layer_of.values() else ""
    del graph.value_info[:]
