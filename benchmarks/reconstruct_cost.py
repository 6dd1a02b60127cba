"""Where block reconstruction's time goes on a 224 px model, side by side in one process
(issue 16): EfficientNet-Lite0 (real weights) calibrated on the 10 even-numbered labelled
images of `efficientnet.py`, then reconstructed for a few iterations per unit in variants:

- `default`: as `fddaq.reconstruct` runs it (chained units, QDrop masks from a bank, batches
  capped at `batch_elements`);
- `prefix`: every unit's inputs cached by running the model up to the unit (no chaining);
- `fresh-masks`: QDrop masks drawn afresh per element and applied with `torch.where`;
- `no-cap`: every batch `--batch-size` images (no `batch_elements` cap).

    .venv/bin/python benchmarks/reconstruct_cost.py [--iterations 10] [--views 64] [--batch-size 32] [--repeats 1]

Per variant: reconstruction wall time, the part spent training (first to last progress event
of each unit, summed) and the rest (caching inputs and targets, the error before and after
each unit). Medians over `--repeats`; ratios to `default`. Needs `benchmarks/requirements.txt`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from efficientnet import model_source, split_labelled
from tables import header

VARIANTS = ("default", "prefix", "fresh-masks", "no-cap")


class _FreshMasks:
    """The masks as drawn before the bank: one uniform draw per element and step."""

    def __init__(self, drop: float, generator: torch.Generator) -> None:
        self.drop, self.generator = drop, generator

    def draw(self, like: torch.Tensor) -> torch.Tensor:
        return (torch.rand(like.shape, generator=self.generator, device=like.device) < self.drop).to(like.dtype)


@contextmanager
def variant(name: str):
    import fddaq.reconstruct as module

    if name == "prefix":
        with mock.patch.object(module, "_chained", lambda model, run, modules, example: [False] * len(modules)):
            yield
    elif name == "fresh-masks":
        with mock.patch.object(module, "_MaskBank", _FreshMasks):
            yield
    else:
        yield


def run(inputs, name: str, args: argparse.Namespace) -> dict:
    from fddaq.config import QuantConfig
    from fddaq.pipeline import quantize_inputs
    from fddaq.recipes import recipe_config

    config = recipe_config("reconstruct", QuantConfig(4, 4), steps=args.iterations)
    reconstruct = replace(config.reconstruct, views=args.views, batch_size=args.batch_size)
    if name == "no-cap":
        reconstruct = replace(reconstruct, batch_elements=2**62)
    config = replace(config, reconstruct=reconstruct)
    spans: dict[int, list[float]] = {}

    def on_event(event) -> None:
        if event.stage == "reconstruct" and "unit" in event.metrics:
            now = time.perf_counter()
            spans.setdefault(int(event.metrics["unit"]), [now, now])[1] = now

    with variant(name):
        result = quantize_inputs(inputs, config, on_event=on_event)
    total = result.timings["reconstruct"]
    # the first step of a unit ends at its first event: count it as one step of the span's average
    steps = max(args.iterations - 1, 1)
    training = sum((end - begin) * args.iterations / steps for begin, end in spans.values())
    return {"total": total, "training": training, "rest": total - training}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--views", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = parser.parse_args()
    from fddaq.pipeline import load_inputs

    root = Path(tempfile.mkdtemp())
    calib, held = split_labelled(root)
    classes = root / "classes.txt"
    classes.write_text("\n".join(str(i) for i in range(1000)))
    inputs = load_inputs(model_source("lite0", calib, held, classes))
    results: dict[str, list[dict]] = {name: [] for name in args.variants}
    for _ in range(args.repeats):  # interleaved: each repeat runs every variant once
        for name in args.variants:
            results[name].append(run(inputs, name, args))
            print(name, results[name][-1], file=sys.stderr, flush=True)
    medians = {name: {key: statistics.median(r[key] for r in rows) for key in rows[0]} for name, rows in results.items()}
    base = medians.get("default")
    print(f"EfficientNet-Lite0, W4A4, {args.iterations} iterations per unit, {args.views} views, batch {args.batch_size}, "
          f"median of {args.repeats}")
    print(header("variant", "reconstruction s", "training s", "caching and error passes s", "total / default"))
    for name, m in medians.items():
        ratio = f"{m['total'] / base['total']:.2f}x" if base else "-"
        print(f"| {name} | {m['total']:.1f} | {m['training']:.1f} | {m['rest']:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
