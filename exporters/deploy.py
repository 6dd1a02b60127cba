"""From a quantized model to a verified deployable file: export the QDQ graph with its
metadata, measure it against the float graph's size and verify it in onnxruntime."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from fddaq import __version__
from fddaq.checkpoint import Checkpoint, ModelInfo
from fddaq.events import EventHandler, emit
from fddaq.quant.modules import QuantizedModel
from fddaq.quant.plan import LayerPlan

from .onnx_export import export_qdq
from .runtime import VerifyReport, check_runnable_opset, load_onnx, onnxruntime_module, verify


@dataclass(frozen=True)
class Deployment:
    onnx: bytes  # the serialized QDQ model
    float_size: int  # bytes of the float ONNX export of the same model
    verify: VerifyReport
    timings: dict[str, float]
    versions: dict[str, str]


def onnx_metadata(info: ModelInfo, plan: LayerPlan) -> dict[str, str]:
    """`metadata_props` of the exported graph: what a deployment needs to feed and read it."""
    compact = lambda value: json.dumps(value, separators=(",", ":"))  # noqa: E731
    return {
        "fddaq_version": __version__,
        "layer_plan": compact(plan.to_json()),
        "preprocessing": compact(info.preprocess.to_json()),
        "class_names": compact(list(info.class_names)),
        "arch": info.arch,
        "scored_output": info.output,
    }


def read_onnx_metadata(path: Path) -> dict[str, str]:
    """The `metadata_props` of an ONNX file (an ExportError when it is not one)."""
    return {prop.key: prop.value for prop in load_onnx(path, external_data=False).metadata_props}


def export_checkpoint(checkpoint: Checkpoint, opset: int = 21, int8_weights: bool = False) -> bytes:
    """The serialized QDQ graph of a loaded checkpoint, in an `opset` the installed onnxruntime
    (when there is one) can run; `int8_weights`: see `export_qdq`."""
    check_runnable_opset(opset)
    proto = export_qdq(checkpoint.model, onnx_metadata(checkpoint.info, checkpoint.plan), opset, int8_weights)
    return proto.SerializeToString()


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
