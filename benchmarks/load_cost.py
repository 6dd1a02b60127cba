"""Decoding cost of a calibration folder (issue 8): images/s of `load_image_folder` with one
decoding thread against the default thread count, and its peak memory against the size of the
decoded tensor.

    .venv/bin/python benchmarks/load_cost.py [--images 400] [--repeats 3] [--json FILE]

The folder holds `--images` JPEGs of 500x375 pixels (ImageNet's typical size; smooth random
content at quality 90) in 100 class folders, decoded with the ImageNet preset (shorter side to
256, centre crop 224). Each setting is timed `--repeats` times, alternating, in one process;
medians are reported, with the ratio. Both settings must give bit-identical tensors. Peak
memory is measured in a fresh process (`ru_maxrss` after the load minus before it).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fddaq.data import default_workers, load_image_folder, preset  # noqa: E402

CLASSES = 100


def write_folder(root: Path, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(count):
        small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)  # smooth content: upsampled noise
        image = Image.fromarray(small).resize((500, 375), Image.BICUBIC)
        folder = root / f"class_{i % CLASSES:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:05d}.jpg", quality=90)


# Linux: writing 5 to clear_refs resets the peak (VmHWM) to the current RSS, so the peak after
# the load minus the RSS before it is what the load itself took.
PEAK = """
import re, sys
sys.path.insert(0, sys.argv[2])
from fddaq.data import load_image_folder, preset
def kib(field):
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))
open("/proc/self/clear_refs", "w").write("5")
before = kib("VmRSS")
x = load_image_folder(sys.argv[1], preset("imagenet", 3)).images
print((kib("VmHWM") - before) / 1024, x.numel() * 4 / 2**20)
"""


def peak_memory(root: Path) -> dict:
    """Peak RSS growth of one load in a fresh process, against the decoded tensor's size (MiB)."""
    out = subprocess.run([sys.executable, "-c", PEAK, str(root), str(ROOT)], check=True, capture_output=True, text=True)
    growth, tensor = map(float, out.stdout.split())
    return {"peak_growth_mib": round(growth, 1), "tensor_mib": round(tensor, 1), "ratio": round(growth / tensor, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    workers = default_workers()
    prep = preset("imagenet", 3)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_folder(root, args.images)
        times: dict[int, list[float]] = {1: [], workers: []}
        results = {}
        for _ in range(args.repeats):
            for count in times:
                start = time.perf_counter()
                results[count] = load_image_folder(root, prep, workers=count).images
                times[count].append(time.perf_counter() - start)
        identical = torch.equal(results[1], results[workers])
        memory = peak_memory(root)
    rows = {count: args.images / statistics.median(t) for count, t in times.items()}
    report = {
        "images": args.images, "workers": workers, "images_per_s": {str(k): round(v, 1) for k, v in rows.items()},
        "speedup": round(rows[workers] / rows[1], 2), "identical": identical, "memory": memory,
        "torch": torch.__version__, "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    }
    print("| decoding threads | images/s |\n|---|---|")
    for count, rate in rows.items():
        print(f"| {count} | {rate:.1f} |")
    print(f"\nspeedup {report['speedup']}x with {workers} threads; bit-identical: {identical}; "
          f"peak memory growth {memory['peak_growth_mib']} MiB for a {memory['tensor_mib']} MiB tensor "
          f"({memory['ratio']}x)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if not identical:
        sys.exit("decoding threads changed the images")


if __name__ == "__main__":
    main()
