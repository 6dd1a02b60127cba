"""The demo's table on the bundled val/ subset and on the full 10,000-image Fashion-MNIST test
set, plus the demo's wall time (median of repeats).

    .venv/bin/python benchmarks/demo.py [--repeats 3] [--json results.json]

Needs the Debian package `dataset-fashion-mnist` for the full test set. Each run is the real
command line (`fddaq quantize`, a fresh process), timed from start to exit.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fashion_mnist"
sys.path.insert(0, str(EXAMPLE))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import fmnist
from tables import header

STAGES = ("load", "calibrate", "synthesize", "reconstruct", "finetune", "evaluate", "export", "verify")


def run(val: Path, out: Path, extra: list[str]) -> tuple[dict, float]:
    fddaq = Path(sys.executable).parent / "fddaq"
    command = [
        str(fddaq), "quantize", str(EXAMPLE / "model.pth"), "--arch", "fddaq:fashion_resnet",
        "--calib", str(EXAMPLE / "calib"), "--val", str(val), "--bits", "4", "--out", str(out),
        "--force", "--quiet", *extra,
    ]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "report.json").read_text()), time.perf_counter() - start


def row(name: str, report: dict, wall: float) -> str:
    acc, size = report["accuracy"], report["size"]
    return (
        f"| {name} | {report['data']['val_images']} | {acc['float_top1']:.2f} | {acc['fake_quant_top1']:.2f} | "
        f"{acc['onnx_top1']:.2f} | {acc['onnx_vs_fake_quant_agreement']:.2f} | {size['ratio']:.3f} "
        f"({size['onnx_bytes'] / 1024:.1f} / {size['float_onnx_bytes'] / 1024:.1f} KiB) | "
        + " / ".join(f"{report['timings_s'].get(k, 0.0):.1f}" for k in STAGES)
        + f" | {wall:.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="demo runs on val/ for the wall-time median")
    parser.add_argument("--json", type=Path, help="also write every report here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images, labels = fmnist.read_split("t10k")
        fmnist.write_image_folder(images, labels, range(len(labels)), tmp / "test")
        demo = [run(EXAMPLE / "val", tmp / f"demo{i}", []) for i in range(args.repeats)]
        full = run(tmp / "test", tmp / "full", [])
        ptq = run(tmp / "test", tmp / "ptq", ["--steps", "0"])

    walls = [wall for _, wall in demo]
    print(f"machine: {platform.machine()}, {platform.python_version()}, date {time.strftime('%Y-%m-%d')}")
    print(header("run", "images", "float top-1", "fake-quant top-1", "ONNX top-1", "ONNX vs fake-quant agreement",
                 "ONNX size vs float", f"{' / '.join(STAGES)} (s)", "wall (s)"))
    print(row("demo, val/ (median-wall run)", demo[walls.index(statistics.median(walls))][0], statistics.median(walls)))
    print(row("demo, full test set", *full))
    print(row("calibration only (--steps 0), full test set", *ptq))
    print(f"demo wall time over {len(walls)} runs: median {statistics.median(walls):.1f}s, "
          f"min {min(walls):.1f}s, max {max(walls):.1f}s")
    if args.json:
        args.json.write_text(json.dumps({"demo": demo, "full": full, "ptq": ptq}, indent=2))


if __name__ == "__main__":
    main()
