"""How fast fddaq's graphs run in onnxruntime (CPU), against the float graph and onnxruntime's
own quantizer on the same model (issue 19).

    .venv/bin/python benchmarks/latency.py [--models lite0 lite1 resnet18 mobilenet_v3_large]
        [--batches 1 16] [--repeats 15] [--threads 2] [--json FILE]

Per model (random weights: latency does not depend on their values; BatchNorm statistics and
affine parameters random too, as training leaves them: with the initial ones every folded bias
is zero, torch's exporter shares one zero initializer between the convs, and onnxruntime's
quantizer then leaves those convs float or fails), graphs:
- `float`: torch's export of the float model (`exporters.export_float`);
- `onnxruntime W8A8`: `quant_pre_process`, then `quantize_static` (QDQ, per-channel int8
  weights, uint8 activations, MinMax) of that float graph;
- `fddaq W8A8`: fddaq's default graph at 8 bits (every tensor between operators quantized);
- `fddaq W8A8 inputs`: only the conv/linear inputs quantized (`--activations inputs`);
- `fddaq W4A8`, `fddaq W4A4`: 4-bit weights (INT4 initializers), default activations (at
  W4A4: the layer inputs); `fddaq W4A4 all`: every tensor quantized at 4 bits;
- `fddaq W4A8 int8-stored`: 4-bit weights on the symmetric grid stored as INT8
  (`fddaq export --int8-weights`).
Both quantizers calibrate on the same 8 random images (ranges do not change the kernels).
Each graph gets an onnxruntime session with every graph optimization, `--threads` intra-op
threads, sequential execution and no busy-waiting between runs. Timing is interleaved: each
repeat runs every graph in turn, starting one graph further each time (one warm-up call, then
the median of 3 timed calls), and a graph's latency is the median over the repeats; the ratios
compare those medians. The table also gives each file's size and the
integer and float kernels of the optimized graph. The CPU and its vector instruction sets
(`/proc/cpuinfo`) head the output.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tables import markdown_table

from exporters.onnx_export import export_float, export_qdq
from exporters.runtime import FLOAT_OPS, INTEGER_OPS
from fddaq.config import QuantConfig
from fddaq.models import build_model
from fddaq.quant.calibrate import calibrate_min_max
from fddaq.quant.capture import capture
from fddaq.quant.plan import resolve_layer_plan
from fddaq.quant.prepare import prepare

MODELS = {  # name -> (architecture spec, its arguments, input size)
    "lite0": ("fddaq:efficientnet_lite0", (), 224),
    "lite1": ("efficientnet_lite_pytorch:EfficientNet.from_name", ("efficientnet-lite1",), 240),
    "resnet18": ("torchvision:resnet18", (), 224),
    "mobilenet_v3_large": ("torchvision:mobilenet_v3_large", (), 224),
}
FDDAQ_GRAPHS = {  # graph -> (weight bits, activation bits, activations, weight grid, INT8 weight storage)
    "fddaq W8A8": (8, 8, "auto", "auto", False),
    "fddaq W8A8 inputs": (8, 8, "inputs", "auto", False),
    "fddaq W4A8": (4, 8, "auto", "auto", False),
    "fddaq W4A8 int8-stored": (4, 8, "auto", "symmetric", True),
    "fddaq W4A4": (4, 4, "auto", "auto", False),
    "fddaq W4A4 all": (4, 4, "all", "auto", False),
}
INSTRUCTION_SETS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8")


def cpu() -> str:
    """The CPU's model name and the vector instruction sets it has that onnxruntime's kernels use."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "unknown")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    return f"{name}; {', '.join(f for f in INSTRUCTION_SETS if f in flags) or 'none of ' + ', '.join(INSTRUCTION_SETS)}"


def graphs(name: str, folder: Path) -> dict[str, Path]:
    """Every graph of model `name`, written to `folder`."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    spec, args, size = MODELS[name]
    torch.manual_seed(0)
    model = build_model(spec, None, args).eval()
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            with torch.no_grad():
                module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                module.weight.copy_(0.5 + torch.rand(n, generator=generator))
                module.bias.copy_(0.1 * torch.randn(n, generator=generator))
    images = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(1))
    found = capture(model, images[:2])
    paths = {"float": folder / "float.onnx"}
    paths["float"].write_bytes(export_float(model, (3, size, size)).SerializeToString())

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": images[i : i + 1].numpy()} for i in range(len(images))])

        def get_next(self):
            return next(self.batches, None)

    prepared = folder / "float_prepared.onnx"
    quant_pre_process(str(paths["float"]), str(prepared))
    paths["onnxruntime W8A8"] = folder / "onnxruntime.onnx"
    quantize_static(str(prepared), str(paths["onnxruntime W8A8"]), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    for graph, (weight_bits, act_bits, activations, grid, int8_weights) in FDDAQ_GRAPHS.items():
        config = QuantConfig(weight_bits, act_bits, activations=activations, weight_grid=grid)
        qmodel = prepare(model, found, resolve_layer_plan(found, config), found.outputs[0].name)
        calibrate_min_max(qmodel, images)
        paths[graph] = folder / f"{graph.replace(' ', '_')}.onnx"
        paths[graph].write_bytes(export_qdq(qmodel, int8_weights=int8_weights).SerializeToString())
    return paths


def session(path: Path, threads: int, optimized: Path | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # no busy-waiting after a run: each session has its own threads, and a session's spinning
    # threads would take the cores from the next graph timed (measured: 1.1-1.5x at batch 1)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
        options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def kernels(path: Path, threads: int) -> dict[str, int]:
    """Integer kernels, float conv/matmul kernels and the Q/DQ nodes left in the optimized graph."""
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        session(path, threads, optimized)
        ops = Counter(node.op_type for node in onnx.load(str(optimized)).graph.node)
    return {
        "integer": sum(n for op, n in ops.items() if op in INTEGER_OPS),
        "float": sum(n for op, n in ops.items() if op in FLOAT_OPS),
        "qdq": ops["QuantizeLinear"] + ops["DequantizeLinear"],
        "ops": dict(sorted(ops.items())),
    }


def latencies(paths: dict[str, Path], size: int, batch: int, repeats: int, threads: int) -> dict[str, float]:
    """Median milliseconds per call of each graph on `batch` images of `size` pixels, interleaved
    (see the module doc)."""
    sessions = {graph: session(path, threads) for graph, path in paths.items()}
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    times: dict[str, list[float]] = {graph: [] for graph in paths}
    order = list(sessions)
    for repeat in range(repeats):
        for graph in order[repeat % len(order):] + order[: repeat % len(order)]:  # each graph after each other
            run = sessions[graph]
            feed = {run.get_inputs()[0].name: x}
            run.run(None, feed)
            calls = []
            for _ in range(3):
                start = time.perf_counter()
                run.run(None, feed)
                calls.append(time.perf_counter() - start)
            times[graph].append(statistics.median(calls))
    return {graph: 1000 * statistics.median(values) for graph, values in times.items()}


def measure(name: str, batches: list[int], repeats: int, threads: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = graphs(name, Path(tmp))
        counted = {graph: kernels(path, threads) for graph, path in paths.items()}
        for batch in batches:
            ms = latencies(paths, MODELS[name][2], batch, repeats, threads)
            for graph, path in paths.items():
                rows.append({
                    "model": name, "batch": batch, "graph": graph, "ms": ms[graph],
                    "vs_onnxruntime": ms[graph] / ms["onnxruntime W8A8"], "speedup_vs_float": ms["float"] / ms[graph],
                    "bytes": path.stat().st_size, "kernels": counted[graph],
                })
    return rows


def table(rows: list[dict]) -> str:
    columns = ("model", "batch", "graph", "ms", "x onnxruntime W8A8", "speed-up over float", "MB",
               "integer / float kernels, Q+DQ left")
    return markdown_table(columns, (
        (r["model"], r["batch"], r["graph"], f"{r['ms']:.2f}", f"{r['vs_onnxruntime']:.2f}x",
         f"{r['speedup_vs_float']:.2f}x", f"{r['bytes'] / 1e6:.2f}",
         f"{r['kernels']['integer']} / {r['kernels']['float']}, {r['kernels']['qdq']}")
        for r in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu()}; onnxruntime {__import__('onnxruntime').__version__}, {args.threads} threads", flush=True)
    rows = []
    for name in args.models:
        rows += measure(name, args.batches, args.repeats, args.threads)
        print(table([row for row in rows if row["model"] == name]), flush=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
