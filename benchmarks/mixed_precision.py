"""Mixed precision under a budget (issue 20): fddaq's bit search (`--target-size`,
`--target-drop`) against uniform bit widths and onnxruntime's uniform quantizer, on
EfficientNet-Lite0 or Lite1 with their ImageNet weights, or on a bundled Fashion-MNIST model.

    .venv/bin/python benchmarks/mixed_precision.py [--model lite0|lite1|mobilenet|resnet]
        [--targets size:0.16 size:0.2 drop:2] [--recipe ptq|reconstruct] [--seeds 0 1 2]
        [--uniform 8/8 4/8] [--json FILE] [--curves DIR]

- EfficientNet-Lite (setup as in `efficientnet.py`): calibration on the 10 even-numbered
  labelled foolbox images (one per class: the search holds out a quarter of them, whatever
  their class, and measures plans on 256 views of those); scores of the exported ONNX in
  onnxruntime against the float model on the 176 held-out photo views (top-1 agreement, KL),
  and top-1 on the 10 other labelled images.
- Fashion-MNIST (`mobilenet`, `resnet`; needs `apt-get install dataset-fashion-mnist`): the
  bundled calibration folder (119 images, about 12 per class: the search holds out a quarter of
  each class); scores on the full 10,000-image test set: top-1 accuracy, and agreement and KL
  against the float model.

Rows, each for every seed of `--seeds` (the recipe's seed, and the search's held-out split):
- `fddaq W8A8`, `fddaq W4A8`: one width for every layer (the same recipe);
- `onnxruntime W8A8`: `quantize_static` (MinMax and Percentile, QDQ, per-channel; as in
  `peers.py`), the best of the two by agreement is onnxruntime's best uniform quantizer
  (it has no 4-bit weight mode of its own here);
- `size:R` / `drop:P`: the bit search for that budget, weight bits from `--bit-choices` (4 and 8), 8-bit
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
from tables import markdown_table


def efficientnet_setup(model: str, root: Path):
    """(inputs, score: ONNX path -> scores) for EfficientNet-Lite `model`."""
    from efficientnet import prepared, scores

    from exporters import run_onnx

    inputs, natural, float_held, float_natural = prepared(model, root)
    labels = inputs.val.labels.numpy()

    def score(path: Path) -> dict:
        found = scores(run_onnx(path, natural.images, optimize=True), float_natural)
        top1 = (run_onnx(path, inputs.val.images, optimize=True).argmax(1) == labels).mean()
        return {"agreement": found["agreement"], "kl": found["kl"], "top1": 100.0 * float(top1),
                "float_top1": 100.0 * float((float_held.argmax(1) == labels).mean())}

    return inputs, score


def fashion_setup(model: str, root: Path):
    """(inputs, score) for the bundled Fashion-MNIST `model`, scored on the full test set."""
    import fmnist
    from efficientnet import scores
    from recipes import EXAMPLE, test_set  # first: it puts the example's folder on the path

    from exporters import run_onnx
    from fddaq.evaluate import predict
    from fddaq.pipeline import Source, load_inputs

    inputs = load_inputs(Source(*fmnist.model_source(model), EXAMPLE / "calib"))
    x, y = test_set()
    float_logits = predict(inputs.teacher, x).numpy()
    labels = y.numpy()

    def score(path: Path) -> dict:
        logits = run_onnx(path, x, optimize=True)
        found = scores(logits, float_logits)
        return {"agreement": found["agreement"], "kl": found["kl"], "top1": 100.0 * float((logits.argmax(1) == labels).mean()),
                "float_top1": 100.0 * float((float_logits.argmax(1) == labels).mean())}

    return inputs, score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lite0", choices=["lite0", "lite1", "mobilenet", "resnet"])
    parser.add_argument("--targets", nargs="+", default=["size:0.16", "size:0.2"], help="size:RATIO or drop:POINTS")
    parser.add_argument("--recipe", default="ptq", choices=["ptq", "reconstruct"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--bit-choices", default="4,8", help="weight widths the search chooses from")
    parser.add_argument("--uniform", nargs="*", default=["8/8", "4/8"], help="W/A uniform settings of fddaq")
    parser.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True, help="onnxruntime's rows")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--curves", type=Path, help="folder for each search's chart")
    args = parser.parse_args()

    import peers
    import torch

    from cli.jobs import precision_chart, precision_report
    from exporters import export_float, export_qdq
    from fddaq.config import BudgetConfig, QuantConfig, parse_bit_choices
    from fddaq.io import png_bytes
    from fddaq.pipeline import quantize_inputs
    from fddaq.recipes import recipe_config

    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        setup = efficientnet_setup if args.model.startswith("lite") else fashion_setup
        inputs, score = setup(args.model, root)
        float_path = root / "float.onnx"
        float_path.write_bytes(export_float(inputs.float_model, inputs.input_shape).SerializeToString())
        float_bytes = float_path.stat().st_size

        def scored(name: str, graph_bytes: bytes, seconds: float, seed: int | None, **extra) -> None:
            path = root / "graph.onnx"
            path.write_bytes(graph_bytes)
            rows.append({"model": args.model, "row": name, "recipe": args.recipe, "seed": seed,
                         "ratio": len(graph_bytes) / float_bytes, **score(path), "seconds": seconds, **extra})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))

        if args.peers:
            for method in ("MinMax", "Percentile"):
                start = time.perf_counter()
                out = root / f"ort_{method}.onnx"
                peers.quantize(float_path, out, inputs.calib.images.numpy(), "W8A8", method)
                scored(f"onnxruntime W8A8 {method}", out.read_bytes(), time.perf_counter() - start, None)
        for seed in args.seeds:
            for setting in args.uniform:
                w, a = (int(v) for v in setting.split("/"))
                start = time.perf_counter()
                result = quantize_inputs(inputs, recipe_config(args.recipe, QuantConfig(w, a), seed))
                scored(f"fddaq W{w}A{a}", export_qdq(result.model).SerializeToString(), time.perf_counter() - start, seed)
            for target in args.targets:
                kind, _, value = target.partition(":")
                budget = BudgetConfig(**{"target_size" if kind == "size" else "target_drop": float(value)},
                                      bit_choices=parse_bit_choices(args.bit_choices))
                config = replace(recipe_config(args.recipe, QuantConfig(8, 8), seed), budget=budget)
                start = time.perf_counter()
                result = quantize_inputs(inputs, config)
                graph = export_qdq(result.model).SerializeToString()
                report = precision_report(result.precision, len(graph) / float_bytes, 8)
                if args.curves:
                    args.curves.mkdir(parents=True, exist_ok=True)
                    chart = args.curves / f"{args.model}_{kind}{value}_{args.recipe}_seed{seed}.png"
                    chart.write_bytes(png_bytes(precision_chart(report)))
                bits = list(result.precision.chosen.bits.values())
                scored(target, graph, time.perf_counter() - start, seed, search_seconds=result.timings["bit search"],
                       met=report["met"], verdict=report["verdict"], bit_choices=budget.bit_choices,
                       layers_at={b: bits.count(b) for b in budget.bit_choices}, search_drop=result.precision.chosen.drop,
                       predicted_ratio=result.precision.chosen.ratio,
                       search_uniform_drops={name: p.drop for name, p in result.precision.uniform.items()})
    print(table(rows))


def table(rows: list[dict]) -> str:
    columns = ("model", "row", "recipe", "seed", "ONNX size / float", "agreement with float", "KL", "top-1 (float)",
               "layers at each width", "budget", "wall s (search)")
    return markdown_table(columns, (
        (r["model"], r["row"], r["recipe"], "-" if r["seed"] is None else r["seed"], f"{r['ratio']:.3f}x",
         f"{r['agreement']:.2f}", f"{r['kl']:.4f}", f"{r['top1']:.2f} ({r['float_top1']:.2f})",
         " / ".join(f"{n} at {b}" for b, n in r["layers_at"].items()) if "layers_at" in r else "-",
         ("met" if r["met"] else "missed") if "met" in r else "-",
         f"{r['seconds']:.0f}" + (f" ({r['search_seconds']:.0f})" if "search_seconds" in r else ""))
        for r in rows))


if __name__ == "__main__":
    main()
