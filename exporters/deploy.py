"""From a quantized model to a verified deployable file: export the QDQ graph with its
metadata, measure it against the float graph's size and verify it in onnxruntime."""

from __future__ import annotations

import time
from dataclasses import dataclass

import onnx
import torch

from fddaq.checkpoint import Checkpoint, ModelInfo
from fddaq.events import EventHandler, emit
from fddaq.quant.modules import QuantizedModel
from fddaq.quant.plan import LayerPlan

from .metadata import onnx_metadata
from .onnx_export import export_qdq
from .runtime import VerifyReport, check_runnable_opset, onnxruntime_module, verify


@dataclass(frozen=True)
class Deployment:
    onnx: bytes  # the serialized QDQ model
    float_size: int  # bytes of the float ONNX export of the same model
    verify: VerifyReport
    timings: dict[str, float]
    versions: dict[str, str]


def export_checkpoint(checkpoint: Checkpoint, opset: int = 21, int8_weights: bool = False) -> bytes:
    """The serialized QDQ graph of a loaded checkpoint, in an `opset` the installed onnxruntime
    (when there is one) can run; `int8_weights`: see `export_qdq`."""
    check_runnable_opset(opset)
    proto = export_qdq(checkpoint.model, onnx_metadata(checkpoint.info, checkpoint.plan), opset, int8_weights)
    return bytes(proto.SerializeToString())


def deploy(
    model: QuantizedModel,
    float_size: int,
    info: ModelInfo,
    plan: LayerPlan,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    opset: int = 21,
    on_event: EventHandler | None = None,
) -> Deployment:
    """Export `model` (fake-quant) and verify it in onnxruntime on `images`; `float_size`: the
    bytes of the float model's ONNX (the dry run exported it)."""
    start = time.perf_counter()
    emit(on_event, "export", 0, 1)
    proto = export_qdq(model, onnx_metadata(info, plan), opset)
    emit(on_event, "export", 1, 1)
    exported = time.perf_counter()
    report = verify(proto, model, images, labels, on_event=on_event)
    verified = time.perf_counter()
    return Deployment(
        proto.SerializeToString(), float_size, report,
        {"export": exported - start, "verify": verified - exported},
        {"onnx": onnx.__version__, "onnxruntime": onnxruntime_module().__version__},
    )
