"""What a command runs and writes: core job, export and verification, report. Every file is
written atomically, and only once everything it depends on has succeeded."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

from fddaq import __version__
from fddaq.checkpoint import checkpoint_bytes
from fddaq.events import EventHandler
from fddaq.io import atomic_write_bytes, atomic_write_json
from fddaq.pipeline import QuantizeJob, quantize


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}%"


def run_quantize(job: QuantizeJob, out: Path, on_event: EventHandler | None = None) -> dict:
    """Quantize, export, verify; write quantized.pt, model.onnx and report.json into `out`."""
    from exporters.deploy import deploy

    start = time.perf_counter()
    result = quantize(job, on_event)
    checkpoint = checkpoint_bytes(result.model, result.plan, result.info, {"config": job.config.to_json()})
    check = result.val or result.calib
    deployment = deploy(result.model, result.float_model, result.info, result.plan, check.images,
                        check.labels if check.labelled else None)
    timings = {**result.timings, **deployment.timings, "total": time.perf_counter() - start}
    verify = deployment.verify
    drop = None
    if result.float_top1 is not None and verify.onnx_top1 is not None:
        drop = result.float_top1 - verify.onnx_top1
    report = {
        "fddaq_version": __version__,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, **deployment.versions},
        "command": "quantize",
        "inputs": {
            "model": str(job.model_path), "arch": job.arch, "calib": str(job.calib_dir),
            "val": None if job.val_dir is None else str(job.val_dir),
        },
        "config": job.config.to_json(),
        "model": result.info.to_json(),
        "plan": result.plan.to_json(),
        "data": {
            "calib_images": len(result.calib), "calib_skipped": result.calib.skipped,
            "val_images": None if result.val is None else len(result.val),
            "val_skipped": None if result.val is None else result.val.skipped,
            "verify_set": "val" if result.val is not None else "calib",
        },
        "accuracy": {
            "float_top1": result.float_top1,
            "fake_quant_top1": result.quant_top1,
            "onnx_top1": verify.onnx_top1 if result.val is not None else None,
            "onnx_vs_fake_quant_agreement": verify.agreement,
        },
        "verify": verify.to_json(),
        "size": {
            "float_onnx_bytes": deployment.float_size,
            "onnx_bytes": len(deployment.onnx),
            "ratio": len(deployment.onnx) / deployment.float_size,
        },
        "finetune": result.finetune.to_json(),
        "timings_s": timings,
        "gate": {"drop": drop},
    }
    report["table"] = [
        ("float top-1 (val)", _pct(result.float_top1)),
        ("fake-quant top-1 (val)", _pct(result.quant_top1)),
        ("ONNX top-1 (val)", _pct(report["accuracy"]["onnx_top1"])),
        (f"ONNX vs fake-quant top-1 agreement ({report['data']['verify_set']}, {verify.samples} images)", _pct(verify.agreement)),
        ("ONNX max |logit diff| vs fake-quant", f"{verify.max_abs_diff:.2e}"),
        ("same, onnxruntime graph optimizations on", f"{_pct(verify.optimized_agreement)} agree, max diff {verify.optimized_max_abs_diff:.2e}"),
        ("ONNX size vs float ONNX", f"{len(deployment.onnx) / 1024:.1f} KiB / {deployment.float_size / 1024:.1f} KiB "
                                     f"= {report['size']['ratio']:.3f}x"),
        *((f"time: {stage}", f"{seconds:.2f}s") for stage, seconds in timings.items()),
    ]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "quantized.pt", checkpoint)
    atomic_write_bytes(out / "model.onnx", deployment.onnx)
    atomic_write_json(out / "report.json", report)
    return report
