"""Find what cannot be exported before any work: export the float model and a quantized copy
of it (ranges from random images, nothing trained), check the float graph against PyTorch on
a new batch and load the quantized one in onnxruntime with optimizations off and on.

`fddaq plan` runs it, and `quantize` and `synth` run it before decoding images or training
anything: a model that would fail at the end fails in its first seconds instead, with the
operation, the module and the source line."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fddaq.errors import ExportError, first_line
from fddaq.quant.calibrate import calibrate_min_max
from fddaq.quant.capture import Capture, output_leaves
from fddaq.quant.plan import LayerPlan
from fddaq.quant.prepare import prepare

from .onnx_export import export_float, export_qdq
from .runtime import inference_session

BATCH = 2  # the dry run's batch: also proves the batch dimension is not fixed in the graph
TOLERANCE = 1e-3  # of the largest output value: the float graph against PyTorch


@dataclass(frozen=True)
class DryRun:
    float_bytes: int
    qdq_bytes: int
    seconds: float


@torch.no_grad()
def dry_run(model: nn.Module, capture: Capture, plan: LayerPlan, output: str, opset: int = 21) -> DryRun:
    """Export `model` (float, CPU) and its quantized form under `plan`, and run both graphs;
    an ExportError says what fails."""
    start = time.perf_counter()
    model = model.eval()
    images = torch.randn(BATCH, *capture.input_shape, generator=torch.Generator().manual_seed(0))
    float_proto = export_float(model, capture.input_shape, opset=opset)
    expected = dict(output_leaves(model(images)))
    got = _run(float_proto.SerializeToString(), images, optimize=False, what="the float graph")
    for name, value in got.items():
        reference = expected[name].float().numpy()
        difference = float(np.abs(value - reference).max(initial=0.0))
        if difference > TOLERANCE * max(1.0, float(np.abs(reference).max(initial=0.0))):
            raise ExportError(
                f"the exported graph computes output {name!r} differently from the model on new inputs (largest "
                f"difference {difference:.3g}): torch's exporter recorded one run of the forward, and this one "
                "depends on something that run fixed (the batch size, or values read from tensors)"
            )
    if plan.quantized:
        qmodel = prepare(model, capture, plan, output)
        calibrate_min_max(qmodel, images)
        qdq = export_qdq(qmodel, opset=opset).SerializeToString()
        for optimize in (False, True):
            _run(qdq, images, optimize, "the quantized graph")
    else:
        qdq = b""
    return DryRun(len(float_proto.SerializeToString()), len(qdq), time.perf_counter() - start)


def _run(model: bytes, images: torch.Tensor, optimize: bool, what: str) -> dict[str, np.ndarray]:
    session = inference_session(model, optimize=optimize)
    names = [output.name for output in session.get_outputs()]
    try:
        values = session.run(names, {session.get_inputs()[0].name: images.numpy()})
    except Exception as error:  # onnxruntime's own types
        raise ExportError(
            f"onnxruntime cannot run {what} on a batch of {len(images)}{' with graph optimizations' if optimize else ''}: "
            f"{first_line(error)}"
        ) from error
    return dict(zip(names, values))
