"""fddaq against onnxruntime's own quantizer on the bundled Fashion-MNIST ResNet, in one table
(issue 7): same float model, same calibration images (the first 1 or 10 per class of
`examples/fashion_mnist/calib`), top-1 of the exported ONNX in onnxruntime on the full
10,000-image test set, wall time and peak memory of each row.

    .venv/bin/python benchmarks/head_to_head.py [--quick] [--seeds 0 1 2] [--per-class 1 10] [--settings W8A8 W4A4 W4A4-fl8 W3A3] [--json FILE]

Rows: onnxruntime `quantize_static` (QDQ, per-channel; MinMax, Entropy, Percentile; see
`peers.py`) and fddaq's `ptq`, `real-only`, `fdda-paper` and `fddaq` recipes (see
`recipes.py`, whose child processes run them); per class 0 is fddaq's `data-free` recipe (no
real image at all). `--quick` (5 minutes on 2 cores): one seed, 0 and 10 images per
class, W8A8 and W4A4, onnxruntime MinMax and Percentile. Needs
`apt-get install dataset-fashion-mnist`. Then EfficientNet-Lite0's table (`efficientnet.py`: one seed,
80 minutes on 2 cores; `--models fashion` skips it, as `--quick` does).
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
import efficientnet  # noqa: E402
import peers  # noqa: E402
import recipes  # noqa: E402

# setting -> recipes.py --bits value
SETTINGS = {"W8A8": "8/8", "W4A4": "4/4", "W4A4-fl8": "4/4/8", "W3A3": "3/3"}
PEER_SETTINGS = set(peers.SETTINGS)  # onnxruntime has no 3-bit type


def fddaq_rows(per_class: int, seed: int, settings: list[str]) -> list[dict]:
    """fddaq's four recipes at `settings` for one calibration set and seed (a recipes.py child)."""
    out = subprocess.run(
        [sys.executable, recipes.__file__, "--child", str(per_class), str(seed),
         "--bits", *(SETTINGS[s] for s in settings), "--ablate"],
        check=True, stdout=subprocess.PIPE, text=True,
    )
    label = lambda method: "fddaq (default)" if method == "fddaq" else f"fddaq {method}"  # noqa: E731
    return [{**row, "method": label(row["method"]), "peak_rss_mib": row["group_peak_rss_mib"]}
            for row in json.loads(out.stdout.strip().splitlines()[-1])]


def peer_rows(per_class: int, settings: list[str], methods: list[str], float_path: Path) -> list[dict]:
    rows = []
    for setting in settings:
        if setting not in PEER_SETTINGS or per_class == 0:
            continue
        for method in methods:
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                rows.append(pool.submit(peers.run, str(float_path), per_class, setting, method).result())
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


ORDER = ("onnxruntime", "fddaq ptq", "fddaq real-only", "fddaq data-free", "fddaq fdda-paper", "fddaq (default)")


def table(rows: list[dict]) -> str:
    methods = sorted(dict.fromkeys(r["method"] for r in rows),
                     key=lambda m: next(i for i, prefix in enumerate(ORDER + ("",)) if m.startswith(prefix)))
    keys = sorted({(r["per_class"], r["bits"]) for r in rows}, key=lambda k: (k[0], list(SETTINGS).index(k[1])))
    lines = [
        "| per class | setting | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    costs = []
    for per_class, setting in keys:
        cells = []
        for method in methods:
            found = [r for r in rows if (r["per_class"], r["bits"], r["method"]) == (per_class, setting, method)]
            accs = [r["onnx_top1"] for r in found]
            spread = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
            cells.append(f"{statistics.mean(accs):.2f}{spread}" if accs else "n/a")
            if found:
                costs.append((method, statistics.median(r["seconds"] for r in found), max(r["peak_rss_mib"] for r in found)))
        lines.append(f"| {per_class or '0 (data-free)'} | {setting} | " + " | ".join(cells) + " |")
    lines += ["", "| method | wall s (median of rows) | peak RSS MiB (max) |", "|---|---|---|"]
    for method in methods:
        mine = [c for c in costs if c[0] == method]
        lines.append(f"| {method} | {statistics.median(c[1] for c in mine):.1f} | {max(c[2] for c in mine):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one seed, 0 and 10 per class, W8A8 and W4A4, two peer calibrators")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--per-class", type=int, nargs="+", default=[0, 1, 10], help="0: data-free")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--peer-methods", nargs="+", default=list(peers.METHODS), choices=peers.METHODS)
    parser.add_argument("--models", nargs="+", default=["fashion", "efficientnet"], choices=["fashion", "efficientnet"])
    parser.add_argument("--json", type=Path, help="also write every row here")
    parser.add_argument("--render", type=Path, help="only print the table of the rows a --json run wrote")
    args = parser.parse_args()
    if args.render:
        print(table(json.loads(args.render.read_text())))
        return
    if args.quick:
        args.seeds, args.per_class, args.settings, args.peer_methods = [0], [0, 10], ["W8A8", "W4A4"], ["MinMax", "Percentile"]
        args.models = ["fashion"]
    if "fashion" in args.models:
        fashion(args)
    if "efficientnet" in args.models:  # one seed, its own script's defaults (80 minutes on 2 cores)
        command = [sys.executable, efficientnet.__file__]
        if args.json:
            command += ["--json", str(args.json.with_name(args.json.stem + "-efficientnet.json"))]
        text = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
        print("\nEfficientNet-Lite0, W8A8 and W4A4 all layers, 10 ImageNet images, one seed:\n\n" + text)


def fashion(args: argparse.Namespace) -> None:
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        float_path = Path(tmp) / "float.onnx"
        peers.float_onnx(float_path)
        for per_class in args.per_class:
            rows += peer_rows(per_class, args.settings, args.peer_methods, float_path)
            for seed in args.seeds:
                rows += fddaq_rows(per_class, seed, args.settings)
                if args.json:
                    args.json.write_text(json.dumps(rows, indent=1))
    floats = {round(r["float_top1"], 2) for r in rows if "float_top1" in r}  # fddaq rows measure it
    print(f"Fashion-MNIST ResNet, float top-1: {', '.join(f'{f:.2f}' for f in sorted(floats))} (full test set)\n")
    print(table(rows))


if __name__ == "__main__":
    main()
