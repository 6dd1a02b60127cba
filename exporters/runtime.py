"""Run exported graphs in onnxruntime (CPU) and compare them with the PyTorch model."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from fddaq.errors import ExportError


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


def run_onnx(
    model: onnx.ModelProto | bytes | str | Path,
    images: torch.Tensor | np.ndarray,
    optimize: bool = False,
    batch_size: int = 256,
) -> np.ndarray:
    """The model's first output (logits) for `images`, run on the CPU provider in batches.

    `optimize` turns on every graph optimization (onnxruntime's fused integer kernels)."""
    ort = onnxruntime_module()
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    if isinstance(source, Path):
        source = str(source)
    try:
        session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types for unusable models
        raise ExportError(f"onnxruntime cannot load the model: {str(error).strip().splitlines()[0]}") from error
    input_name = session.get_inputs()[0].name
    output_name = session.get_outputs()[0].name
    images = _as_numpy(images)
    batches = [
        session.run([output_name], {input_name: images[start : start + batch_size]})[0]
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(batches)


@dataclass(frozen=True)
class VerifyReport:
    """How closely onnxruntime reproduces the PyTorch fake-quant model on the same images.

    Agreements and accuracies are percentages; differences are of the logits."""

    samples: int
    agreement: float
    max_abs_diff: float
    mean_abs_diff: float
    onnx_top1: float | None
    torch_top1: float | None
    optimized_agreement: float
    optimized_max_abs_diff: float

    def to_json(self) -> dict[str, float | int | None]:
        return asdict(self)


def _percent(mask: np.ndarray) -> float:
    return 100.0 * float(mask.mean())


@torch.no_grad()
def _run_torch(model: nn.Module, images: np.ndarray, batch_size: int) -> np.ndarray:
    model = copy.deepcopy(model).cpu().float().eval()
    batches = [
        model(torch.from_numpy(images[start : start + batch_size])).numpy()
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(batches)


def verify(
    onnx_model: onnx.ModelProto | bytes | str | Path,
    torch_model: nn.Module,
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray | None = None,
    batch_size: int = 256,
) -> VerifyReport:
    """Run the ONNX graph (optimizations off, then on) and the PyTorch model (eval, CPU, float32)
    on `images` and compare their logits and top-1 predictions."""
    images = _as_numpy(images)
    if len(images) == 0:
        raise ExportError("verification needs at least one image")
    if labels is not None and len(labels) != len(images):
        raise ExportError(f"verification got {len(labels)} labels for {len(images)} images")
    reference = _run_torch(torch_model, images, batch_size)
    plain = run_onnx(onnx_model, images, optimize=False, batch_size=batch_size)
    optimized = run_onnx(onnx_model, images, optimize=True, batch_size=batch_size)
    torch_pred = reference.argmax(axis=1)
    diff = np.abs(plain - reference)
    if labels is not None:
        labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    return VerifyReport(
        samples=len(images),
        agreement=_percent(plain.argmax(axis=1) == torch_pred),
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        onnx_top1=None if labels is None else _percent(plain.argmax(axis=1) == labels),
        torch_top1=None if labels is None else _percent(torch_pred == labels),
        optimized_agreement=_percent(optimized.argmax(axis=1) == torch_pred),
        optimized_max_abs_diff=float(np.abs(optimized - reference).max()),
    )
