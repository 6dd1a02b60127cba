"""Run exported graphs in onnxruntime (CPU) and compare them with the PyTorch model."""

from __future__ import annotations

import copy
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from fddaq.errors import ExportError, first_line
from fddaq.events import EventHandler, emit
from fddaq.quant.fold import fold_batch_norms
from fddaq.quant.modules import FAKE_QUANT_LAYERS

from .onnx_export import conv_pads, layer_input


def onnxruntime_module():
    """The onnxruntime module, or an ExportError naming the extra to install."""
    try:
        import onnxruntime
    except ImportError as error:
        raise ExportError(
            "onnxruntime is not installed: pip install 'fddaq[cpu]' (or 'fddaq[gpu]' on a CUDA host)"
        ) from error
    return onnxruntime


def _as_numpy(images: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    return np.ascontiguousarray(images, dtype=np.float32)


def inference_session(model: onnx.ModelProto | bytes | str | Path, optimize: bool, optimized_path: Path | None = None):
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


def _batches(session, images: np.ndarray, batch_size: int, outputs: list[str] | None = None):
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
) -> np.ndarray:
    """The model's first output (logits) for `images`, run on the CPU provider in batches.

    `optimize` turns on every graph optimization (onnxruntime's fused integer kernels)."""
    return run_session(inference_session(model, optimize), images, batch_size)


def run_session(session, images: torch.Tensor | np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The first output (logits) of an `inference_session` for `images`, in batches."""
    return np.concatenate([out[0] for out in _batches(session, _as_numpy(images), batch_size)])


# Operators of onnxruntime's integer kernels (what QDQ node groups fuse into on the CPU).
INTEGER_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger",
               "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits", "QLinearAdd",
               "QLinearGlobalAveragePool", "QLinearAveragePool")
FLOAT_OPS = ("Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul")


def _op_counts(path: Path) -> dict[str, int]:
    return dict(sorted(Counter(node.op_type for node in onnx.load(str(path)).graph.node).items()))


def optimized_ops(model: onnx.ModelProto | bytes | str | Path) -> dict[str, int]:
    """Operator counts of the graph onnxruntime runs with every CPU optimization on."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "optimized.onnx"
        inference_session(model, optimize=True, optimized_path=path)
        return _op_counts(path)


@dataclass(frozen=True)
class VerifyReport:
    """How closely onnxruntime reproduces the PyTorch fake-quant model on the same images.

    Agreements and accuracies are percentages. Logit differences are given as values and in
    output steps: the last layer's integer accumulator step (input scale x weight scale of each
    output channel), when the logits are that layer's output (else None). Activations: every
    quantized layer input is compared as integers (graph optimizations off; where the graph
    folds zero padding into a conv it quantizes before padding, and the border is left out);
    `activation_*` count the values compared, those that differ and the largest difference in
    steps, with both models running freely (a one-step difference early on can grow through
    later layers).
    `local_*`: the same, with every PyTorch quantizer fed the graph's values for the layers
    before it, so that a difference is one layer's own arithmetic: an export error shows
    here, while float32 summation order alone leaves a tiny fraction at one step.
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
    onnx_top1: float | None
    torch_top1: float | None
    optimized_agreement: float
    optimized_max_abs_diff: float
    optimized_max_step_diff: float | None
    optimized_top1: float | None
    integer_ops: dict[str, int]
    float_ops: dict[str, int]

    def to_json(self) -> dict:
        return asdict(self)


def _percent(mask: np.ndarray) -> float:
    return 100.0 * float(mask.mean())


def _input_quantizers(model: nn.Module) -> dict[str, nn.Module]:
    """Layer name -> its input quantizer, for every fake-quant layer with one enabled."""
    return {
        name: module.input_quant
        for name, module in model.named_modules()
        if isinstance(module, FAKE_QUANT_LAYERS) and module.input_quant.enabled
    }


def _quantizer_codes(values: np.ndarray, quantizer: nn.Module) -> np.ndarray:
    """Integer codes of dequantized values of `quantizer`'s grid."""
    scale = np.float32(quantizer.scale().item())
    return np.round(values / scale).astype(np.int64) + int(quantizer.zero_point.item())


@dataclass
class _Tally:
    """Quantized activation values compared, those that differ, the largest difference."""

    values: int = 0
    mismatches: int = 0
    worst: int = 0

    def add(self, onnx_values: np.ndarray, torch_values: np.ndarray, quantizer: nn.Module) -> None:
        difference = np.abs(_quantizer_codes(onnx_values, quantizer) - _quantizer_codes(torch_values, quantizer))
        self.values += difference.size
        self.mismatches += int(np.count_nonzero(difference))
        self.worst = max(self.worst, int(difference.max(initial=0)))


class _Probe:
    """Forward hooks on input quantizers: each records its output and, for a quantizer in
    `forced`, replaces the output by that value."""

    def __init__(self, quantizers: dict[str, nn.Module]) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self.forced: dict[str, torch.Tensor] = {}
        self.handles = [q.register_forward_hook(self._hook(name)) for name, q in quantizers.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            self.outputs[name] = output
            return self.forced.get(name)  # None keeps the output

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _folded_padding(onnx_model: onnx.ModelProto, model: nn.Module, layers: list[str]) -> dict[str, list[int]]:
    """Layer -> zero padding [top, left, bottom, right] the graph folded into its Conv node
    (named after the layer): its pads beyond the module's own."""
    found = {}
    for node in onnx_model.graph.node:
        if node.op_type == "Conv" and node.name in layers:
            pads = next((list(a.ints) for a in node.attribute if a.name == "pads"), [0, 0, 0, 0])
            extra = [p - own for p, own in zip(pads, conv_pads(model.get_submodule(node.name)))]
            if any(extra):
                found[node.name] = extra
    return found


def _cropped(values: torch.Tensor, padding: list[int] | None, shape: tuple[int, ...]) -> np.ndarray:
    """PyTorch's quantized input without the padding the graph adds after quantizing."""
    if padding is not None:
        top, left, bottom, right = padding
        values = values[..., top : values.shape[-2] - bottom, left : values.shape[-1] - right]
    if tuple(values.shape) != tuple(shape):
        raise ExportError(f"a quantized layer input has shape {tuple(shape)} in the ONNX graph and "
                          f"{tuple(values.shape)} in the PyTorch model: they are not the same model")
    return values.numpy()


def _padded(values: np.ndarray, padding: list[int] | None) -> torch.Tensor:
    """The graph's quantized input as PyTorch's quantizer outputs it: zero padding added (zero
    quantizes to the zero point, which dequantizes to zero)."""
    tensor = torch.from_numpy(values)
    if padding is None:
        return tensor
    top, left, bottom, right = padding
    return torch.nn.functional.pad(tensor, (left, right, top, bottom))


def _output_step(model: nn.Module, images: np.ndarray) -> np.ndarray | None:
    """The last layer's accumulator step per output, when the model returns that layer's output."""
    layers = [m for m in model.modules() if isinstance(m, FAKE_QUANT_LAYERS)]
    if not layers:
        return None
    outputs = []
    handle = layers[-1].register_forward_hook(lambda m, args, out: outputs.append(out))
    with torch.no_grad():
        result = model(torch.from_numpy(images[:1]))
    handle.remove()
    last = layers[-1]
    if not outputs or outputs[-1] is not result or result.dim() != 2 or not last.input_quant.enabled:
        return None
    return (last.input_quant.scale() * last.weight_quant.scale()).detach().numpy().astype(np.float64)


def verify(
    onnx_model: onnx.ModelProto | bytes | str | Path,
    torch_model: nn.Module,
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray | None = None,
    batch_size: int = 256,
    on_event: EventHandler | None = None,
) -> VerifyReport:
    """Run the ONNX graph (optimizations off, then on) and the PyTorch model (folded, eval, CPU,
    float32) on `images` and compare their logits, top-1 predictions and quantized activations.
    `on_event` gets "verify" progress: one step per batch, of both passes."""
    images = _as_numpy(images)
    if len(images) == 0:
        raise ExportError("verification needs at least one image")
    if labels is not None and len(labels) != len(images):
        raise ExportError(f"verification got {len(labels)} labels for {len(images)} images")
    if isinstance(onnx_model, (str, Path)):
        onnx_model = onnx.load(str(onnx_model))
    elif isinstance(onnx_model, bytes):
        onnx_model = onnx.load_from_string(onnx_model)
    model = fold_batch_norms(torch_model).cpu().float()  # a copy

    # ONNX with every quantized layer input as an extra output, PyTorch with hooks on the same
    quantizers = _input_quantizers(model)
    produced = {output for node in onnx_model.graph.node for output in node.output}
    compared = [name for name in quantizers if layer_input(name) in produced]
    probed = copy.deepcopy(onnx_model)
    probed.graph.output.extend(
        onnx.helper.make_tensor_value_info(layer_input(name), onnx.TensorProto.FLOAT, None) for name in compared
    )
    session = inference_session(probed, optimize=False)
    padding = _folded_padding(onnx_model, model, compared)
    probe = _Probe({name: quantizers[name] for name in compared})
    reference, plain = [], []
    free, local = _Tally(), _Tally()
    batches = -(-len(images) // batch_size)
    emit(on_event, "verify", 0, 2 * batches)
    try:
        outputs = [session.get_outputs()[0].name] + [layer_input(name) for name in compared]
        for start, (logits, *activations) in zip(range(0, len(images), batch_size), _batches(session, images, batch_size, outputs)):
            emit(on_event, "verify", start // batch_size + 1, 2 * batches)
            x = torch.from_numpy(images[start : start + batch_size])
            plain.append(logits)
            with torch.no_grad():
                probe.forced = {}
                reference.append(model(x).numpy())
                graph = dict(zip(compared, activations))
                for name, values in graph.items():
                    free.add(values, _cropped(probe.outputs[name], padding.get(name), values.shape), quantizers[name])
                probe.forced = {name: _padded(values, padding.get(name)) for name, values in graph.items()}
                model(x)
                for name, values in graph.items():
                    local.add(values, _cropped(probe.outputs[name], padding.get(name), values.shape), quantizers[name])
    finally:
        probe.remove()
    reference, plain = np.concatenate(reference), np.concatenate(plain)
    if reference.shape != plain.shape:
        raise ExportError(f"the ONNX model outputs shape {plain.shape[1:]} where the PyTorch model outputs "
                          f"{reference.shape[1:]}: they are not the same model")
    with tempfile.TemporaryDirectory() as tmp:  # one optimized session: run it, count its kernels
        path = Path(tmp) / "optimized.onnx"
        session = inference_session(onnx_model, optimize=True, optimized_path=path)
        optimized = []
        for index, (logits,) in enumerate(_batches(session, images, batch_size)):
            optimized.append(logits)
            emit(on_event, "verify", batches + index + 1, 2 * batches)
        optimized = np.concatenate(optimized)
        ops = _op_counts(path)
    step = _output_step(model, images)
    torch_pred = reference.argmax(axis=1)
    diff = np.abs(plain - reference)
    optimized_diff = np.abs(optimized - reference)
    if labels is not None:
        labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    return VerifyReport(
        samples=len(images),
        agreement=_percent(plain.argmax(axis=1) == torch_pred),
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        max_step_diff=None if step is None else float((diff / step).max()),
        mean_step_diff=None if step is None else float((diff / step).mean()),
        activation_values=free.values,
        activation_mismatches=free.mismatches,
        activation_max_step_diff=free.worst,
        local_mismatches=local.mismatches,
        local_max_step_diff=local.worst,
        onnx_top1=None if labels is None else _percent(plain.argmax(axis=1) == labels),
        torch_top1=None if labels is None else _percent(torch_pred == labels),
        optimized_agreement=_percent(optimized.argmax(axis=1) == torch_pred),
        optimized_max_abs_diff=float(optimized_diff.max()),
        optimized_max_step_diff=None if step is None else float((optimized_diff / step).max()),
        optimized_top1=None if labels is None else _percent(optimized.argmax(axis=1) == labels),
        integer_ops={op: n for op, n in ops.items() if op in INTEGER_OPS},
        float_ops={op: n for op, n in ops.items() if op in FLOAT_OPS},
    )
