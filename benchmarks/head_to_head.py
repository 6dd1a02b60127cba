"""fddaq against onnxruntime's own quantizer on both bundled Fashion-MNIST models (the ResNet
and the MobileNet), in one table (issues 7 and 16): same float model, same calibration images
(the first 1 or 10 per class of `examples/fashion_mnist/calib`), top-1 of the exported ONNX in
onnxruntime on the full 10,000-image test set, wall time and peak memory of each row.

    .venv/bin/python benchmarks/head_to_head.py [--quick] [--models resnet mobilenet efficientnet] [--seeds 0 1 2]
        [--per-class 0 1 10] [--settings W8A8 W4A4 W4A4-fl8 W3A3] [--json FILE]

Rows: onnxruntime `quantize_static` (QDQ, per-channel; MinMax, Entropy, Percentile; see
`peers.py`) and fddaq's recipes (`recipes.py`, whose child processes run them: `reconstruct`,
the default, `ptq`, `real-only`, `fdda-paper`, `fddaq`); per class 0 is fddaq's `data-free`
recipe (no real image at all). `--quick`: one seed, 0 and 10 images per class, W8A8 and W4A4,
onnxruntime MinMax and Percentile, both Fashion models. Needs `apt-get install
dataset-fashion-mnist`. `efficientnet` adds EfficientNet-Lite0's table (`efficientnet.py`:
one seed, its own defaults, over an hour on 2 cores; not with `--quick`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import efficientnet
import peers
import recipes
from tables import header, row

from fddaq.recipes import DEFAULT_RECIPE

FASHION = tuple(recipes.fmnist.MODELS)  # the bundled models

# setting -> recipes.py --bits value
SETTINGS = {"W8A8": "8/8", "W4A4": "4/4", "W4A4-fl8": "4/4/8", "W3A3": "3/3",  # fddaq's default tensor set
            # matching tensor sets (peers.py): every tensor between operators, or the conv/linear inputs only
            "W8A8-inputs": "8/8:inputs", "W4A4-inputs": "4/4:inputs", "W4A4-all": "4/4:all"}
PEER_SETTINGS = set(peers.SETTINGS)  # onnxruntime has no 3-bit type


def fddaq_rows(model: str, per_class: int, seed: int, settings: list[str]) -> list[dict]:
    """fddaq's recipes at `settings` for one model, calibration set and seed (a recipes.py child)."""
    out = subprocess.run(
        [sys.executable, recipes.__file__, "--child", model, str(per_class), str(seed),
         "--bits", *(SETTINGS[s] for s in settings), "--ablate"],
        check=True, stdout=subprocess.PIPE, text=True,
    )
    label = lambda method: f"fddaq {method}" + (" (default)" if method == DEFAULT_RECIPE else "")
    return [{**row, "method": label(row["method"]), "peak_rss_mib": row["group_peak_rss_mib"]}
            for row in json.loads(out.stdout.strip().splitlines()[-1])]


def peer_rows(model: str, per_class: int, settings: list[str], methods: list[str], float_path: Path) -> list[dict]:
    rows = []
    for setting in settings:
        if setting not in PEER_SETTINGS or per_class == 0:
            continue
        for method in methods:
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                rows.append(pool.submit(peers.run, str(float_path), model, per_class, setting, method).result())
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


ORDER = ("onnxruntime", "fddaq ptq", "fddaq real-only", "fddaq data-free", "fddaq fdda-paper", "fddaq fddaq",
         "fddaq reconstruct")


def table(rows: list[dict]) -> str:
    methods = sorted(dict.fromkeys(r["method"] for r in rows),
                     key=lambda m: next(i for i, prefix in enumerate(ORDER + ("",)) if m.startswith(prefix)))
    models = list(dict.fromkeys(r.get("model", "resnet") for r in rows))  # rows written before issue 16: the ResNet
    keys = sorted({(r.get("model", "resnet"), r["per_class"], r["bits"]) for r in rows},
                  key=lambda k: (models.index(k[0]), k[1], list(SETTINGS).index(k[2])))
    lines = [header("model", "per class", "setting", *methods)]
    costs = []
    for model, per_class, setting in keys:
        cells = []
        for method in methods:
            found = [r for r in rows
                     if (r.get("model", "resnet"), r["per_class"], r["bits"], r["method"]) == (model, per_class, setting, method)]
            accs = [r["onnx_top1"] for r in found]
            spread = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
            cells.append(f"{statistics.mean(accs):.2f}{spread}" if accs else "n/a")
            if found:
                costs.append((method, statistics.median(r["seconds"] for r in found), max(r["peak_rss_mib"] for r in found)))
        lines.append(row(model, per_class or "0 (data-free)", setting, *cells))
    lines += ["", header("method", "wall s (median of rows)", "peak RSS MiB (max)")]
    for method in methods:
        mine = [c for c in costs if c[0] == method]
        lines.append(row(method, f"{statistics.median(c[1] for c in mine):.1f}", f"{max(c[2] for c in mine):.0f}"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one seed, 0 and 10 per class, W8A8 and W4A4, two peer calibrators")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--per-class", type=int, nargs="+", default=[0, 1, 10], help="0: data-free")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--peer-methods", nargs="+", default=list(peers.METHODS), choices=peers.METHODS)
    parser.add_argument("--models", nargs="+", default=[*FASHION, "efficientnet"], choices=[*FASHION, "efficientnet"])
    parser.add_argument("--json", type=Path, help="also write every row here")
    parser.add_argument("--render", type=Path, help="only print the table of the rows a --json run wrote")
    args = parser.parse_args()
    if args.render:
        print(table(json.loads(args.render.read_text())))
        return
    if args.quick:
        args.seeds, args.per_class, args.settings, args.peer_methods = [0], [0, 10], ["W8A8", "W4A4"], ["MinMax", "Percentile"]
        args.models = list(FASHION)
    if any(model in FASHION for model in args.models):
        fashion(args)
    if "efficientnet" in args.models:  # one seed, its own script's defaults (80 minutes on 2 cores)
        command = [sys.executable, efficientnet.__file__]
        if args.json:
            command += ["--json", str(args.json.with_name(args.json.stem + "-efficientnet.json"))]
        text = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
        print("\nEfficientNet-Lite0, W8A8 and W4A4 all layers, 10 ImageNet images, one seed:\n\n" + text)


def fashion(args: argparse.Namespace) -> None:
    rows: list[dict] = []
    models = [model for model in args.models if model in FASHION]
    for model in models:
        with tempfile.TemporaryDirectory() as tmp:
            float_path = Path(tmp) / "float.onnx"
            peers.float_onnx(float_path, model)
            for per_class in args.per_class:
                rows += peer_rows(model, per_class, args.settings, args.peer_methods, float_path)
                for seed in args.seeds:
                    rows += fddaq_rows(model, per_class, seed, args.settings)
                    if args.json:
                        args.json.write_text(json.dumps(rows, indent=1))
    for model in models:  # fddaq rows measure the float model
        floats = {round(r["float_top1"], 2) for r in rows if r["model"] == model and "float_top1" in r}
        print(f"Fashion-MNIST {model}, float top-1: {', '.join(f'{f:.2f}' for f in sorted(floats))} (full test set)")
    print("\n" + table(rows))


if __name__ == "__main__":
    main()
