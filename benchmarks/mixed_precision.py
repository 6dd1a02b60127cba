"""Mixed precision under a budget (issue 20): fddaq's bit search (`--target-size`,
`--target-drop`) against uniform bit widths and onnxruntime's uniform quantizer, on
EfficientNet-Lite0 or Lite1 with their ImageNet weights.

    .venv/bin/python benchmarks/mixed_precision.py [--model lite0|lite1] [--targets size:0.16 size:0.2 drop:2]
        [--recipe ptq|reconstruct] [--uniform 8/8 4/8] [--json FILE] [--curves DIR]

Setup as in `efficientnet.py`: calibration on the 10 even-numbered labelled foolbox images (one
per class: the search holds out a quarter of them, whatever their class, and measures plans on
256 views of those); scores on the exported ONNX in onnxruntime against the float model, on the
176 held-out photo views (top-1 agreement, KL) and the 10 other labelled images. Rows:
- `fddaq W8A8`, `fddaq W4A8`: one width for every layer (the same recipe);
- `onnxruntime W8A8`: `quantize_static` (MinMax and Percentile, QDQ, per-channel; as in
  `peers.py`), the best of the two by photo agreement is onnxruntime's best uniform quantizer
  (it has no 4-bit weight mode of its own here);
- `size:R` / `drop:P`: the bit search for that budget, weight bits from 4 and 8, 8-bit
  activations, then the recipe on the chosen plan. The wall time of the search is given apart
  from the run's. `--curves DIR` writes each search's size-vs-agreement chart (as
  `fddaq quantize` writes precision.png).
The ONNX size is the written file's against the float ONNX file's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lite0", choices=["lite0", "lite1"])
    parser.add_argument("--targets", nargs="+", default=["size:0.16", "size:0.2"], help="size:RATIO or drop:POINTS")
    parser.add_argument("--recipe", default="ptq", choices=["ptq", "reconstruct"])
    parser.add_argument("--uniform", nargs="*", default=["8/8", "4/8"], help="W/A uniform settings of fddaq")
    parser.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True, help="onnxruntime's rows")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--curves", type=Path, help="folder for each search's chart")
    args = parser.parse_args()

    import torch

    import peers
    from cli.jobs import precision_chart, precision_report
    from efficientnet import prepared, scores
    from exporters import export_float, export_qdq, run_onnx
    from fddaq.config import BudgetConfig, QuantConfig
    from fddaq.io import png_bytes
    from fddaq.pipeline import quantize_inputs
    from fddaq.recipes import recipe_config

    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        inputs, natural, float_held, float_natural = prepared(args.model, root)
        labels = inputs.val.labels.numpy()
        float_path = root / "float.onnx"
        float_path.write_bytes(export_float(inputs.float_model, inputs.input_shape).SerializeToString())
        float_bytes = float_path.stat().st_size

        def scored(name: str, graph_bytes: bytes, seconds: float, **extra) -> None:
            path = root / "graph.onnx"
            path.write_bytes(graph_bytes)
            held_logits = run_onnx(path, inputs.val.images, optimize=True)
            rows.append({"model": args.model, "row": name, "recipe": args.recipe, "ratio": len(graph_bytes) / float_bytes,
                         "natural": scores(run_onnx(path, natural.images, optimize=True), float_natural),
                         "held_top1": 100.0 * float((held_logits.argmax(1) == labels).mean()),
                         "float_held_top1": 100.0 * float((float_held.argmax(1) == labels).mean()),
                         "seconds": seconds, **extra})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))

        if args.peers:
            for method in ("MinMax", "Percentile"):
                start = time.perf_counter()
                out = root / f"ort_{method}.onnx"
                peers.quantize(float_path, out, inputs.calib.images.numpy(), "W8A8", method)
                scored(f"onnxruntime W8A8 {method}", out.read_bytes(), time.perf_counter() - start)
        for setting in args.uniform:
            w, a = (int(v) for v in setting.split("/"))
            start = time.perf_counter()
            result = quantize_inputs(inputs, recipe_config(args.recipe, QuantConfig(w, a)))
            scored(f"fddaq W{w}A{a}", export_qdq(result.model).SerializeToString(), time.perf_counter() - start)
        for target in args.targets:
            kind, _, value = target.partition(":")
            budget = BudgetConfig(**{"target_size" if kind == "size" else "target_drop": float(value)})
            config = replace(recipe_config(args.recipe, QuantConfig(8, 8)), budget=budget)
            start = time.perf_counter()
            result = quantize_inputs(inputs, config)
            graph = export_qdq(result.model).SerializeToString()
            report = precision_report(result.precision, len(graph) / float_bytes, 8)
            if args.curves:
                args.curves.mkdir(parents=True, exist_ok=True)
                (args.curves / f"{args.model}_{kind}{value}.png").write_bytes(png_bytes(precision_chart(report)))
            bits = list(result.precision.chosen.bits.values())
            scored(target, graph, time.perf_counter() - start, search_seconds=result.timings["bit search"],
                   met=report["met"], verdict=report["verdict"], layers_at_4=bits.count(4), layers_at_8=bits.count(8),
                   search_drop=result.precision.chosen.drop, predicted_ratio=result.precision.chosen.ratio,
                   search_uniform_drops={name: p.drop for name, p in result.precision.uniform.items()})
    print(table(rows))


def table(rows: list[dict]) -> str:
    lines = ["| model | row | recipe | ONNX size / float | agreement, 176 photo views | KL | labelled top-1 (float) "
             "| layers at 4 / 8 bits | budget | wall s (search) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        layers = f"{r['layers_at_4']} / {r['layers_at_8']}" if "layers_at_4" in r else "-"
        budget = ("met" if r["met"] else "missed") if "met" in r else "-"
        wall = f"{r['seconds']:.0f}" + (f" ({r['search_seconds']:.0f})" if "search_seconds" in r else "")
        lines.append(f"| {r['model']} | {r['row']} | {r['recipe']} | {r['ratio']:.3f}x | {r['natural']['agreement']:.1f} | "
                     f"{r['natural']['kl']:.3f} | {r['held_top1']:.0f} ({r['float_held_top1']:.0f}) | {layers} | {budget} | {wall} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
