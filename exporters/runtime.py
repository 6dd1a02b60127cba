"""Run exported graphs in onnxruntime (CPU) and compare them with the PyTorch model."""

from __future__ import annotations

import copy
import functools
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from fddaq.errors import ExportError, first_line
from fddaq.evaluate import class_logits
from fddaq.events import EventHandler, emit
from fddaq.quant.capture import output_leaves, resolve_output
from fddaq.quant.fold import fold_batch_norms
from fddaq.quant.modules import ActivationQuantizer, QuantizedModel, QuantLayer

from .onnx_export import MIN_OPSET, layer_input

Session = Any  # an onnxruntime.InferenceSession (onnxruntime ships no type stubs)


def onnxruntime_module() -> ModuleType:
    """The onnxruntime module, or an ExportError naming the extra to install."""
    try:
        import onnxruntime
    except ImportError as error:
        raise ExportError(
            "onnxruntime is not installed: pip install 'fddaq[cpu]' (or 'fddaq[gpu]' on a CUDA host)"
        ) from error
    module: ModuleType = onnxruntime
    return module


@functools.cache
def newest_runnable_opset() -> int | None:
    """The newest opset in which the installed onnxruntime runs QuantizeLinear and
    DequantizeLinear (a new onnx knows opsets that onnxruntime does not run yet); None without
    onnxruntime."""
    try:
        runtime = onnxruntime_module()
    except ExportError:
        return None
    newest = None
    for opset in range(MIN_OPSET, onnx.defs.onnx_opset_version() + 1):
        scale, zero = helper.make_tensor("s", TensorProto.FLOAT, [], [1.0]), helper.make_tensor("z", TensorProto.UINT8, [], [0])
        graph = helper.make_graph(
            [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
            "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [scale, zero])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
        try:
            runtime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        except Exception:  # onnxruntime raises its own types ("NOT_IMPLEMENTED", unsupported IR)
            break
        newest = opset
    return newest


def check_runnable_opset(opset: int) -> None:
    """An ExportError when the installed onnxruntime cannot run a graph of `opset`."""
    if opset <= MIN_OPSET:  # what every onnxruntime that fddaq supports runs (no probe needed)
        return
    newest = newest_runnable_opset()
    if newest is not None and opset > newest:
        import onnxruntime

        raise ExportError(f"opset={opset}: the installed onnxruntime {onnxruntime.__version__} runs Q/DQ graphs up to "
                          f"opset {newest}; use --opset {MIN_OPSET}..{newest}")


def _as_numpy(images: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    return np.ascontiguousarray(images, dtype=np.float32)


def inference_session(model: onnx.ModelProto | bytes | str | Path, optimize: bool,
                      optimized_path: Path | None = None) -> Session:
    """A CPU inference session; `optimize` turns on every graph optimization (onnxruntime's
    fused integer kernels); `optimized_path` receives the optimized graph."""
    ort = onnxruntime_module()
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
        options.log_severity_level = 3  # not the warning that an optimized graph is machine-specific
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    if isinstance(source, Path):
        source = str(source)
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types for unusable models
        raise ExportError(f"onnxruntime cannot load the model: {first_line(error)}") from error


def _batches(session: Session, images: np.ndarray, batch_size: int,
             outputs: list[str] | None = None) -> Iterator[list[np.ndarray]]:
    """Each batch's requested outputs (default: the first), as lists of arrays."""
    input_name = session.get_inputs()[0].name
    outputs = outputs or [session.get_outputs()[0].name]
    for start in range(0, len(images), batch_size):
        try:
            yield session.run(outputs, {input_name: images[start : start + batch_size]})
        except Exception as error:  # onnxruntime's own types: wrong input shape or type, ...
            raise ExportError(f"onnxruntime cannot run the model on images of shape {images.shape[1:]}: "
                              f"{first_line(error)}") from error


def run_onnx(
    model: onnx.ModelProto | bytes | str | Path,
    images: torch.Tensor | np.ndarray,
    optimize: bool = False,
    batch_size: int = 256,
    output: str | None = None,
) -> np.ndarray:
    """The model's output `output` (default: the first) for `images`, run on the CPU provider
    in batches. `optimize` turns on every graph optimization (onnxruntime's fused integer
    kernels)."""
    return run_session(inference_session(model, optimize), images, batch_size, output)


def run_session(session: Session, images: torch.Tensor | np.ndarray, batch_size: int = 256, output: str | None = None) -> np.ndarray:
    """The output `output` (default: the first) of an `inference_session` for `images`, in
    batches."""
    names = None if output is None else [output]
    return np.concatenate([out[0] for out in _batches(session, _as_numpy(images), batch_size, names)])


ACTIVATION_BUDGET = 1 << 30  # bytes of compared activations `verify` holds per batch
# Operators of onnxruntime's integer kernels (what QDQ node groups fuse into on the CPU).
INTEGER_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger",
               "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits", "QLinearAdd", "QLinearMul",
               "QLinearConcat", "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearSigmoid",
               "QLinearLeakyRelu", "QLinearSoftmax")
FLOAT_OPS = ("Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul")


def load_onnx(path: str | Path, external_data: bool = True) -> onnx.ModelProto:
    """The ONNX model in `path`; an ExportError, not a protobuf traceback, when it is missing
    or not an ONNX file."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"ONNX file {path} does not exist")
    try:
        return onnx.load(str(path), load_external_data=external_data)
    except Exception as exc:  # protobuf raises DecodeError, onnx its own types
        raise ExportError(f"{path} is not a readable ONNX file: {first_line(exc)}") from exc


def optimized_session(model: onnx.ModelProto | bytes | str | Path) -> tuple[Session, dict[str, int]]:
    """An onnxruntime session with every CPU optimization on, and the operator counts of the
    graph it runs (its fused kernels)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "optimized.onnx"
        session = inference_session(model, optimize=True, optimized_path=path)
        return session, dict(sorted(Counter(node.op_type for node in onnx.load(str(path)).graph.node).items()))


@dataclass(frozen=True)
class VerifyReport:
    """How closely onnxruntime reproduces the PyTorch fake-quant model on the same images.

    Every output of the model is compared. Agreements and accuracies are percentages; an
    agreement is that of the top-1 class (dimension 1) at every position of an output (per
    image for logits, per pixel for a segmentation map; of one value per position: its sign),
    a class tied with the top one to float32 rounding counting as the same (`TIE`);
    `agreement` and `optimized_agreement` are the lowest over the outputs (`outputs` has each
    one's agreement and largest difference, optimizations off and on, and its near ties: the
    percentage of positions where PyTorch's top-2 margin is below `NEAR_TIE` of the output's
    spread, which a one-step difference may flip). Logit differences are given as values and,
    for the scored output, in output steps: the last layer's integer accumulator step (input
    scale x weight scale of each output channel), when that output is that layer's output
    (else None). Activations: every quantized layer input is compared as integers (graph
    optimizations off); `activation_*` count the values compared, those that differ and the
    largest difference in steps, with both models running freely (a one-step difference early
    on can grow through later layers).
    `local_*`: the same, with every PyTorch quantizer fed the graph's values for the layers
    before it, so that a difference is one layer's own arithmetic: an export error shows
    here, while float32 summation order alone leaves a tiny fraction at one step.
    `local_agreement`: the top-1 agreement of the graph's outputs with those of that fed
    PyTorch model (the lowest over the outputs): the end-to-end check that does not depend on
    how a network amplifies one-step differences (random weights amplify them a lot: a handful
    of rounding ties early on can move a fifth of the later activations by a step).
    `integer_ops`/`float_ops`: conv/matmul kernels of the optimized graph that run on integers
    and in float."""

    samples: int
    agreement: float
    max_abs_diff: float
    mean_abs_diff: float
    max_step_diff: float | None
    mean_step_diff: float | None
    activation_values: int
    activation_mismatches: int
    activation_max_step_diff: int
    local_mismatches: int
    local_max_step_diff: int
    local_agreement: float
    onnx_top1: float | None
    torch_top1: float | None
    optimized_agreement: float
    optimized_max_abs_diff: float
    optimized_max_step_diff: float | None
    optimized_top1: float | None
    integer_ops: dict[str, int]
    float_ops: dict[str, int]
    outputs: dict[str, dict[str, float]]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _percent(mask: np.ndarray) -> float:
    return 100.0 * float(mask.mean())


# Two logits within this fraction of the larger are a tie that float summation order breaks either
# way (8 float32 units in the last place): the graph may take either class.
TIE = 8 * float(np.finfo(np.float32).eps)
NEAR_TIE = 0.01  # of an output's spread: a top-2 margin below it is a near tie (reported, not forgiven)


def _single(values: np.ndarray) -> bool:
    """Whether the output has one value per position (its sign is the class): no class dimension."""
    return values.ndim < 2 or values.shape[1] == 1


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Top-1 agreement of `a` with the reference `b` over dimension 1 at every position (of a
    single value, a logit: its sign): `a`'s top class is `b`'s, or ties with it in `b` (`TIE` of
    the larger of the two logits); a position where `a` has a NaN never agrees."""
    if _single(b):
        tied = np.abs(b) <= TIE * float(np.abs(b[np.isfinite(b)]).max(initial=0.0))
        return _percent(((np.sign(a) == np.sign(b)) | tied) & ~np.isnan(a))
    picked = np.take_along_axis(b, np.expand_dims(a.argmax(axis=1), 1), axis=1).squeeze(1)
    top = b.max(axis=1)
    with np.errstate(invalid="ignore"):  # inf - inf: not a tie
        gap = top - picked
        tied = np.isfinite(gap) & (gap <= TIE * np.maximum(np.abs(top), np.abs(picked)))
    return _percent(((picked == top) | tied) & ~np.isnan(a).any(axis=1))


def _near_ties(reference: np.ndarray) -> float:
    """Percentage of positions whose top-2 margin (of a single value: its distance from 0) is
    below `NEAR_TIE` of the output's spread (the range of its finite values): where a one-step
    difference can change the class."""
    values = reference[np.isfinite(reference)]
    spread = float(values.max() - values.min()) if values.size else 0.0
    if _single(reference):
        return _percent(np.abs(reference) < NEAR_TIE * spread)
    top2 = np.partition(reference, -2, axis=1).take([-1, -2], axis=1)
    return _percent(top2[:, 0] - top2[:, 1] < NEAR_TIE * spread)


def _quantizer_codes(values: np.ndarray, quantizer: ActivationQuantizer) -> np.ndarray:
    """Integer codes of dequantized values of `quantizer`'s grid."""
    scale = np.float32(quantizer.scale().item())
    codes: np.ndarray = np.round(values / scale).astype(np.int64) + int(quantizer.zero_point.item())
    return codes


@dataclass
class _Tally:
    """Quantized activation values compared, those that differ, the largest difference."""

    values: int = 0
    mismatches: int = 0
    worst: int = 0

    def add(self, onnx_values: np.ndarray, torch_values: np.ndarray, quantizer: ActivationQuantizer) -> None:
        if onnx_values.shape != torch_values.shape:
            raise ExportError(f"a quantized layer input has shape {onnx_values.shape} in the ONNX graph and "
                              f"{torch_values.shape} in the PyTorch model: they are not the same model")
        difference = np.abs(_quantizer_codes(onnx_values, quantizer) - _quantizer_codes(torch_values, quantizer))
        self.values += difference.size
        self.mismatches += int(np.count_nonzero(difference))
        self.worst = max(self.worst, int(difference.max(initial=0)))


class _Probe:
    """A `QuantizedModel.tap` that records each compared activation quantizer's value (a
    layer's input by the layer's name, a site's by the site's) at its first call and, for one
    in `forced`, goes on with that value instead."""

    def __init__(self, names: list[str]) -> None:
        self.names = set(names)
        self.outputs: dict[str, torch.Tensor] = {}
        self.forced: dict[str, torch.Tensor] = {}

    def __call__(self, owner: QuantLayer | ActivationQuantizer, role: str, raw: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        if role not in ("x", "y") or owner.name not in self.names or owner.name in self.outputs:
            return value
        self.outputs[owner.name] = value.clone()  # the model may go on in place (`out += identity`)
        forced = self.forced.get(owner.name)
        return value if forced is None else forced.clone()


def _output_step(model: QuantizedModel, images: np.ndarray) -> np.ndarray | None:
    """The last layer's accumulator step per output channel, when the scored output is that
    layer's output [N, channels]."""
    last = next((layer for layer in model.layers if layer.name == model.capture.layers[-1].name), None)
    if last is None or not last.input_quant.enabled:
        return None
    model.outputs = {}
    try:
        with torch.no_grad():
            result = model(torch.from_numpy(images[:1]))
        produced = model.outputs.get(last.name)
    finally:
        model.outputs = None
    if produced is None or result.dim() != 2 or produced.shape != result.shape or not torch.equal(produced, result):
        return None
    return (last.input_quant.scale() * last.weight_quant.scale()).detach().numpy().astype(np.float64)


def _compare(reference: dict[str, np.ndarray], onnx_outputs: dict[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    """Per output: (agreement, largest absolute difference)."""
    found = {}
    for name, expected in reference.items():
        got = onnx_outputs[name]
        if got.shape != expected.shape:
            raise ExportError(f"the ONNX model's output {name!r} has shape {got.shape[1:]} where the PyTorch model's "
                              f"has {expected.shape[1:]}: they are not the same model")
        found[name] = (_agreement(got, expected), float(np.abs(got - expected).max(initial=0.0)))
    return found


def _batch_size(model: QuantizedModel, compared: list[str], example: np.ndarray) -> int:
    """Images per batch such that the `compared` activations of a batch, held once by
    onnxruntime and twice by PyTorch, stay within `ACTIVATION_BUDGET` bytes (1 to 256)."""
    probe = _Probe(compared)
    model.tap = probe
    try:
        with torch.no_grad():
            model.forward_all(torch.from_numpy(example))
    finally:
        model.tap = None
    per_image = 3 * sum(value.numel() * 4 for value in probe.outputs.values())
    return max(1, min(256, ACTIVATION_BUDGET // max(1, per_image)))


def verify(
    onnx_model: onnx.ModelProto | bytes | str | Path,
    torch_model: QuantizedModel,
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray | None = None,
    batch_size: int | None = None,
    on_event: EventHandler | None = None,
) -> VerifyReport:
    """Run the ONNX graph (optimizations off, then on) and the PyTorch model (deployed, eval,
    CPU, float32) on `images` and compare every output, the scored output's top-1 predictions
    and the quantized activations. Batches hold at most `batch_size` images (default: as many
    as keep the compared activations of a batch within `ACTIVATION_BUDGET` bytes, at most
    256); only the outputs are kept across batches. `on_event` gets "verify" progress: one
    step per batch, of both passes."""
    images = _as_numpy(images)
    if len(images) == 0:
        raise ExportError("verification needs at least one image")
    if labels is not None and len(labels) != len(images):
        raise ExportError(f"verification got {len(labels)} labels for {len(images)} images")
    if isinstance(onnx_model, (str, Path)):
        onnx_model = load_onnx(onnx_model)
    elif isinstance(onnx_model, bytes):
        onnx_model = onnx.load_from_string(onnx_model)
    model = fold_batch_norms(torch_model).cpu().float()  # a copy
    output_names = [output.name for output in onnx_model.graph.output]
    scored = model.output = resolve_output(model.capture.outputs, model.output)  # None (every output): the default
    compared, tensor = _compared(onnx_model, model)
    batch_size = batch_size or _batch_size(model, compared, images[:1])
    batches = -(-len(images) // batch_size)
    emit(on_event, "verify", 0, 2 * batches)
    side = _side_by_side(onnx_model, model, compared, tensor, images, batch_size,
                         lambda done: emit(on_event, "verify", done, 2 * batches))
    reference, fed, plain = side.reference, side.fed, side.plain
    session, ops = optimized_session(onnx_model)  # one optimized session: run it, count its kernels
    batched: dict[str, list[np.ndarray]] = {name: [] for name in output_names}
    for index, values in enumerate(_batches(session, images, batch_size, output_names)):
        for name, value in zip(output_names, values):
            batched[name].append(value)
        emit(on_event, "verify", batches + index + 1, 2 * batches)
    optimized = {name: np.concatenate(parts) for name, parts in batched.items()}
    off, on = _compare(reference, plain), _compare(reference, optimized)
    step = _output_step(model, images)
    diff = np.abs(plain[scored] - reference[scored])
    optimized_diff = np.abs(optimized[scored] - reference[scored])
    if labels is not None:
        labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)

    def top1(values: np.ndarray) -> float | None:
        return None if labels is None else _percent(class_logits(torch.from_numpy(values)).argmax(1).numpy() == labels)

    return VerifyReport(
        samples=len(images),
        agreement=min(agreement for agreement, _ in off.values()),
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        max_step_diff=None if step is None else float((diff / step).max()),
        mean_step_diff=None if step is None else float((diff / step).mean()),
        activation_values=side.free.values,
        activation_mismatches=side.free.mismatches,
        activation_max_step_diff=side.free.worst,
        local_mismatches=side.local.mismatches,
        local_max_step_diff=side.local.worst,
        local_agreement=min(agreement for agreement, _ in _compare(fed, plain).values()),
        onnx_top1=top1(plain[scored]),
        torch_top1=top1(reference[scored]),
        optimized_agreement=min(agreement for agreement, _ in on.values()),
        optimized_max_abs_diff=float(optimized_diff.max()),
        optimized_max_step_diff=None if step is None else float((optimized_diff / step).max()),
        optimized_top1=top1(optimized[scored]),
        integer_ops={op: n for op, n in ops.items() if op in INTEGER_OPS},
        float_ops={op: n for op, n in ops.items() if op in FLOAT_OPS},
        outputs={name: {"agreement": off[name][0], "max_abs_diff": off[name][1], "near_ties": _near_ties(reference[name]),
                        "optimized_agreement": on[name][0], "optimized_max_abs_diff": on[name][1]}
                 for name in output_names},
    )


def _compared(onnx_model: onnx.ModelProto, model: QuantizedModel) -> tuple[list[str], dict[str, str]]:
    """The enabled activation quantizers whose quantized tensor the graph computes (by name),
    and the graph's name of each quantizer's tensor."""
    quantizers = {name: quant for name, quant in model.activation_quantizers().items() if quant.enabled}
    tensor = {name: name if quant.name is not None else layer_input(name) for name, quant in quantizers.items()}
    produced = {output for node in onnx_model.graph.node for output in node.output}
    return [name for name in quantizers if tensor[name] in produced], tensor


@dataclass
class _SideBySide:
    """Both models' outputs on the images, by output name (`reference`: PyTorch's; `fed`:
    PyTorch's with every quantizer fed the graph's values; `plain`: the graph's, optimizations
    off), and the quantized activations compared running freely (`free`) and fed (`local`)."""

    reference: dict[str, np.ndarray]
    fed: dict[str, np.ndarray]
    plain: dict[str, np.ndarray]
    free: _Tally
    local: _Tally


@torch.no_grad()
def _side_by_side(onnx_model: onnx.ModelProto, model: QuantizedModel, compared: list[str], tensor: dict[str, str],
                  images: np.ndarray, batch_size: int, on_batch: Callable[[int], None]) -> _SideBySide:
    """The graph (optimizations off, every `compared` activation an extra output: `tensor` names
    each in the graph, see `_compared`) and `model` (a tap on the same activations) batch by
    batch; `on_batch` gets the batches done."""
    output_names = [output.name for output in onnx_model.graph.output]
    quantizers = model.activation_quantizers()
    probed = copy.deepcopy(onnx_model)
    probed.graph.output.extend(
        onnx.helper.make_tensor_value_info(tensor[name], onnx.TensorProto.FLOAT, None) for name in compared
    )
    session = inference_session(probed, optimize=False)
    probe = _Probe(compared)
    parts: dict[str, dict[str, list[np.ndarray]]] = {side: {name: [] for name in output_names}
                                                     for side in ("reference", "fed", "plain")}
    free, local = _Tally(), _Tally()
    requested = output_names + [tensor[name] for name in compared]
    model.tap = probe
    try:
        for start, values in zip(range(0, len(images), batch_size), _batches(session, images, batch_size, requested)):
            on_batch(start // batch_size + 1)
            x = torch.from_numpy(images[start : start + batch_size])
            for name, value in zip(output_names, values):
                parts["plain"][name].append(value)
            graph = dict(zip(compared, values[len(output_names):]))
            for side, forced, tally in (("reference", {}, free), ("fed", graph, local)):
                probe.outputs, probe.forced = {}, {name: torch.from_numpy(value) for name, value in forced.items()}
                outputs = dict(output_leaves(model.forward_all(x)))
                missing = [name for name in output_names if name not in outputs]
                if missing:
                    raise ExportError(f"the ONNX model has outputs {missing} that the PyTorch model does not return: "
                                      "they are not the same model")
                for name in output_names:
                    parts[side][name].append(outputs[name].numpy())
                for name, value in graph.items():
                    tally.add(value, probe.outputs[name].numpy(), quantizers[name])
    finally:
        model.tap = None
    joined = {side: {name: np.concatenate(found) for name, found in by_name.items()} for side, by_name in parts.items()}
    return _SideBySide(joined["reference"], joined["fed"], joined["plain"], free, local)
