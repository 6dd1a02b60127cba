"""Size, onnxruntime CPU latency, export and verify time of the exported graphs (issue 5).

    .venv/bin/python benchmarks/export_cost.py [--models fashion efficientnet] [--rounds 7]

For each model: the float ONNX and the W8A8 and W4A4 QDQ ONNX (every conv and linear layer,
first and last included, input 8-bit), calibrated only (`ptq`: a graph's size and speed do not
depend on fine-tuning), or with `--steps N` fine-tuned for N steps on the calibration images
(the `fddaq` recipe without synthetic images), which makes the 4-bit parity numbers those of a
usable model. Latency: onnxruntime CPU provider, all graph optimizations on, default
threads; the three graphs are timed side by side, alternating within each round, and the
median over rounds of the mean time per run is reported, at batch 1 and 32. Verification
(optimizations off and on, activations compared as integers) runs on the verify images; next
to its share of differing activation codes, running freely, stands the share that differs
when PyTorch feeds each layer the graph's values of the layers before it (one layer's own
arithmetic: an export error shows there, float32 summation order alone leaves a tiny fraction).

- fashion: the bundled Fashion-MNIST ResNet, calibration `examples/fashion_mnist/calib`
  (100 images), verified on `val/` (2,000 test images).
- efficientnet: EfficientNet-Lite0 (packages in benchmarks/requirements.txt), calibrated and
  verified on the 20 labelled ImageNet images of `foolbox` and their mirror images.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fashion_mnist"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tables import header, row


def sources(name: str, tmp: Path):
    from fddaq.pipeline import Source

    if name == "fashion":
        return Source(EXAMPLE / "model.pth", "fddaq:fashion_resnet", EXAMPLE / "calib", EXAMPLE / "val")
    from synth_quality import efficientnet_inputs

    model, calib, classes = efficientnet_inputs(tmp)
    return Source(model, "fddaq:efficientnet_lite0", calib, classes_file=classes)


def latency_ms(sessions: dict, batch: int, shape: tuple[int, ...], rounds: int, budget_s: float = 0.5) -> dict[str, float]:
    """Median over `rounds` of the mean milliseconds per run; graphs alternate within a round."""
    x = np.random.default_rng(0).standard_normal((batch, *shape), dtype=np.float32)
    runs = {}
    for name, session in sessions.items():  # warm up; size each round to about budget_s
        feed = {session.get_inputs()[0].name: x}
        session.run(None, feed)
        start = time.perf_counter()
        session.run(None, feed)
        runs[name] = max(1, int(budget_s / max(time.perf_counter() - start, 1e-6)))
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            feed = {session.get_inputs()[0].name: x}
            start = time.perf_counter()
            for _ in range(runs[name]):
                session.run(None, feed)
            times[name].append(1000 * (time.perf_counter() - start) / runs[name])
    return {name: statistics.median(values) for name, values in times.items()}


def measure(name: str, rounds: int, steps: int, batch_size: int) -> dict:
    from exporters import export_float, export_qdq, verify
    from exporters.metadata import onnx_metadata
    from exporters.runtime import inference_session
    from fddaq.config import QuantConfig
    from fddaq.pipeline import load_inputs, quantize_inputs
    from fddaq.recipes import recipe_config

    with tempfile.TemporaryDirectory() as tmp:
        inputs = load_inputs(sources(name, Path(tmp)))
    shape = inputs.input_shape
    check = inputs.val or inputs.calib
    images, labels = check.images, check.labels if check.labelled else None
    if inputs.val is None:  # add mirror images (the verify set is the calibration set)
        images = torch.cat([images, images.flip(3)])
        labels = None if labels is None else torch.cat([labels, labels])
    graphs = {"float": export_float(inputs.float_model, shape).SerializeToString()}
    result = {"model": name, "verify_images": len(images)}
    for bits in (8, 4):
        config = recipe_config("ptq", QuantConfig(bits, bits))
        if steps:  # real images only: synthesis at 224 px takes long on a CPU
            config = recipe_config("fddaq", QuantConfig(bits, bits), steps=steps, synthetic=0)
            config = replace(config, finetune=replace(config.finetune, batch_size=batch_size))
        quantized = quantize_inputs(inputs, config)
        start = time.perf_counter()
        proto = export_qdq(quantized.model, onnx_metadata(inputs.info, quantized.plan))
        exported = time.perf_counter()
        report = verify(proto, quantized.model, images, labels)
        verified = time.perf_counter()
        graphs[f"W{bits}A{bits}"] = proto.SerializeToString()
        result[f"W{bits}A{bits}"] = {
            "export_s": exported - start, "verify_s": verified - exported, "verify": report.to_json(),
        }
    result["bytes"] = {key: len(graph) for key, graph in graphs.items()}
    sessions = {key: inference_session(graph, optimize=True) for key, graph in graphs.items()}
    result["latency_ms"] = {str(batch): latency_ms(sessions, batch, shape, rounds) for batch in (1, 32)}
    return result


def table(results: list[dict]) -> str:
    columns = ("model", "graph", "size KiB", "vs float", "latency b=1 ms", "vs float", "latency b=32 ms", "vs float",
               "export s", "verify s", "agreement off / on", "activations differing (max steps)",
               "same, each layer fed the graph's inputs", "integer / float kernels")
    lines = [header(*columns)]
    for r in results:
        size, lat = r["bytes"], r["latency_ms"]
        for graph in ("float", "W8A8", "W4A4"):
            cells = [r["model"], graph, f"{size[graph] / 1024:.1f}", f"{size[graph] / size['float']:.3f}x"]
            for batch in ("1", "32"):
                cells += [f"{lat[batch][graph]:.2f}", f"{lat[batch][graph] / lat[batch]['float']:.2f}x"]
            if graph == "float":
                cells += ["-"] * 6
            else:
                v = r[graph]["verify"]
                kernels = lambda ops: ", ".join(f"{n} {op}" for op, n in ops.items()) or "none"
                cells += [
                    f"{r[graph]['export_s']:.2f}", f"{r[graph]['verify_s']:.2f}",
                    f"{v['agreement']:.2f} / {v['optimized_agreement']:.2f}",
                    f"{v['activation_mismatches'] / v['activation_values']:.2e} ({v['activation_max_step_diff']})",
                    f"{v['local_mismatches'] / v['activation_values']:.2e} ({v['local_max_step_diff']})",
                    f"{kernels(v['integer_ops'])} / {kernels(v['float_ops'])}",
                ]
            lines.append(row(*cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["fashion", "efficientnet"], choices=["fashion", "efficientnet"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=0, help="fine-tuning steps on the real images (0: calibration only)")
    parser.add_argument("--batch-size", type=int, default=32, help="fine-tuning batch size")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()
    results = [measure(name, args.rounds, args.steps, args.batch_size) for name in args.models]
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
