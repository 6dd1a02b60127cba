"""Decoding cost of a calibration folder (issue 8): images/s and peak memory of
`load_image_folder` with one decoding thread, with the default thread count, and optionally
with the loader of another source tree (`--baseline`, e.g. a `git worktree` of an older commit).

    .venv/bin/python benchmarks/load_cost.py [--images 400] [--repeats 5] [--baseline TREE] [--json FILE]

The folder holds `--images` JPEGs of 500x375 pixels (ImageNet's typical size; smooth random
content at quality 90) in 100 class folders, decoded with the ImageNet preset (shorter side to
256, centre crop 224). Every load runs in a fresh process, settings alternating, `--repeats`
times each; medians are reported, with speed ratios against one thread. Peak memory is the
load's own: Linux's VmHWM after it minus VmRSS before it (the peak is reset first), against
the size of the decoded tensor. All settings must give bit-identical tensors.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 100

# argv: folder, source tree, workers ("" = the tree's default). Writing 5 to clear_refs resets
# the peak (VmHWM) to the current RSS, so the peak after the load minus the RSS before it is
# what the load itself took.
LOAD = """
import hashlib, re, sys, time
sys.path.insert(0, sys.argv[2])
from fddaq.data import load_image_folder, preset
def kib(field):
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))
options = {} if sys.argv[3] == "" else {"workers": int(sys.argv[3])}
open("/proc/self/clear_refs", "w").write("5")
before = kib("VmRSS")
start = time.perf_counter()
x = load_image_folder(sys.argv[1], preset("imagenet", 3), **options).images
seconds = time.perf_counter() - start
print(seconds, (kib("VmHWM") - before) / 1024, x.numel() * 4 / 2**20, hashlib.sha256(x.numpy().tobytes()).hexdigest())
"""


def write_folder(root: Path, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(count):
        small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)  # smooth content: upsampled noise
        image = Image.fromarray(small).resize((500, 375), Image.BICUBIC)
        folder = root / f"class_{i % CLASSES:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:05d}.jpg", quality=90)


def load(folder: Path, tree: Path, workers: int | None) -> tuple[float, float, float, str]:
    """Seconds, peak memory growth (MiB), tensor size (MiB) and digest of one load in a fresh process."""
    args = [sys.executable, "-c", LOAD, str(folder), str(tree), "" if workers is None else str(workers)]
    seconds, growth, tensor, digest = subprocess.run(args, check=True, capture_output=True, text=True).stdout.split()
    return float(seconds), float(growth), float(tensor), digest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline", type=Path, help="another source tree whose loader to measure alongside")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from fddaq.data import default_workers

    settings = {"1 thread": (ROOT, 1), f"default ({default_workers()} threads)": (ROOT, None)}
    if args.baseline is not None:
        settings[f"baseline {args.baseline}"] = (args.baseline.resolve(), None)
    runs: dict[str, list[tuple[float, float, float, str]]] = {name: [] for name in settings}
    with tempfile.TemporaryDirectory() as tmp:
        write_folder(Path(tmp), args.images)
        for _ in range(args.repeats):
            for name, (tree, workers) in settings.items():
                runs[name].append(load(Path(tmp), tree, workers))
    serial = args.images / statistics.median(r[0] for r in runs["1 thread"])
    rows = {}
    for name, results in runs.items():
        rate = args.images / statistics.median(r[0] for r in results)
        growth, tensor = statistics.median(r[1] for r in results), results[0][2]
        rows[name] = {"images_per_s": round(rate, 1), "vs_1_thread": round(rate / serial, 2),
                      "peak_growth_mib": round(growth, 1), "tensor_mib": round(tensor, 1),
                      "peak_vs_tensor": round(growth / tensor, 2)}
    identical = len({r[3] for results in runs.values() for r in results}) == 1
    print(f"{args.images} JPEGs, 500x375 -> 224 px; medians of {args.repeats} loads, each in a fresh process\n")
    print("| loader | images/s | vs 1 thread | peak memory / decoded tensor |\n|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['images_per_s']} | {row['vs_1_thread']}x | "
              f"{row['peak_vs_tensor']}x ({row['peak_growth_mib']:.0f} / {row['tensor_mib']:.0f} MiB) |")
    print(f"\nbit-identical tensors: {identical}")
    if args.json:
        args.json.write_text(json.dumps({"images": args.images, "repeats": args.repeats, "rows": rows,
                                         "identical": identical}, indent=2))
    if not identical:
        sys.exit("the loaders gave different tensors")


if __name__ == "__main__":
    main()
