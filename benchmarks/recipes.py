"""Recipes on both bundled Fashion-MNIST models (the ResNet and the MobileNetV2-style net):
accuracy of the exported ONNX on the full 10,000-image test set, for W4A4 / W8A8 / W3A3 / W2A4
(all layers, first and last included; input image 8-bit), 1 and 10 calibration images per
class, several seeds.

    .venv/bin/python benchmarks/recipes.py [--models resnet mobilenet] [--seeds 0 1 2] [--per-class 1 10]
        [--bits 4/4 8/8 3/3 2/4] [--methods ...] [--ablate 10:4/4 10:2/4]

`--bits W/A/F` sets the first and last layers to F bits (`4/4/8`: the W4A4-fl8 rows); a suffix
`:all` or `:inputs` sets `--activations` (`4/4:all`: every tensor between operators quantized).

Methods: `ptq` (calibration only), `real-only` (the fddaq recipe without synthetic data),
`fdda-paper` and `fddaq`, all at the same fine-tuning steps, and `reconstruct` (block-wise
reconstruction instead of fine-tuning); `--per-class 0` runs the
`data-free` recipe instead (no real image; its generator is trained for that group). One generator per (calibration set,
seed) is trained and shared by the two recipes that use synthetic data (their synthesis settings
are identical). Ablations (`--ablate`, default 10/class at W4A4 and W2A4) switch off one fddaq
ingredient at a time: per-image augmentation, learned step sizes (paper-style max|w| weight
ranges and EMA activation ranges instead), or add CE on the labels. Each (calibration set, seed) group runs in its own process; its peak resident
memory is reported for the group. Needs `apt-get install dataset-fashion-mnist`.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fashion_mnist"
sys.path.insert(0, str(EXAMPLE))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import fmnist
from tables import header, row

METHODS = ("ptq", "real-only", "fdda-paper", "fddaq", "reconstruct")
# One fddaq ingredient switched off (or CE added) at a time; run where --ablate asks.
ABLATIONS = {
    "fddaq no-augment": {"augment": False},
    "fddaq fixed-ranges": {"learn_scales": False},
    "fddaq +CE": {"ce_weight": 1.0},
}


def test_set() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = fmnist.read_split("t10k")
    x = (torch.from_numpy(images).float().div(255).unsqueeze(1) - fmnist.MEAN) / fmnist.STD
    return x, torch.from_numpy(labels)


def group(model: str, per_class: int, seed: int, bits: list[str], methods: list[str], ablate: list[str]) -> list[dict]:
    """Every method and bit width for one model, calibration set and seed (run in a child process)."""
    from dataclasses import replace

    from exporters import export_qdq, run_onnx
    from fddaq.config import QuantConfig
    from fddaq.pipeline import Source, load_inputs, quantize_inputs, synthesize
    from fddaq.recipes import recipe_config

    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "calib"
        for folder in sorted((EXAMPLE / "calib").iterdir()):
            (calib / folder.name).mkdir(parents=True)
            for png in sorted(folder.glob("*.png"))[:max(1, per_class)]:  # data-free: loaded, never used
                shutil.copy(png, calib / folder.name / png.name)
        inputs = load_inputs(Source(*fmnist.model_source(model), calib))
    x, y = test_set()
    float_top1 = 100.0 * (run_float(inputs.float_model, x) == y).float().mean().item()
    methods = ("data-free",) if per_class == 0 else tuple(methods)
    synthesis, synth_seconds = None, 0.0

    def synthesized():  # one generator for the group, trained when a recipe first needs it
        nonlocal synthesis, synth_seconds
        if synthesis is None:
            start = time.perf_counter()
            synth_config = recipe_config("data-free" if per_class == 0 else "fddaq", QuantConfig(), seed)
            synthesis = synthesize(inputs, synth_config.synth, real_images=synth_config.real_images)
            synth_seconds = time.perf_counter() - start
        return synthesis

    rows = []
    for setting in bits:
        setting, _, activations = setting.partition(":")
        w, a, *first_last = (int(v) for v in setting.split("/"))
        fl = first_last[0] if first_last else None
        label = f"W{w}A{a}" + (f"-fl{fl}" if fl else "") + (f"-{activations}" if activations else "")
        for method in methods + (tuple(ABLATIONS) if f"{per_class}:{setting}" in ablate else ()):
            recipe = "fddaq" if method == "real-only" or method in ABLATIONS else method
            quant = QuantConfig(w, a, fl, activations=activations or "auto")
            config = recipe_config(recipe, quant, seed, synthetic=0 if method == "real-only" else None)
            config = replace(config, finetune=replace(config.finetune, **ABLATIONS.get(method, {})))
            synthetic = synthesized() if config.synth.num_images else None
            start = time.perf_counter()
            result = quantize_inputs(inputs, config, synthesis=synthetic)
            onnx_model = export_qdq(result.model)
            seconds = time.perf_counter() - start
            logits = run_onnx(onnx_model, x)
            rows.append({
                "model": model, "per_class": per_class, "seed": seed, "bits": label, "method": method,
                "float_top1": float_top1,
                "onnx_top1": 100.0 * float((logits.argmax(1) == y.numpy()).mean()),
                "seconds": seconds + (synth_seconds if config.synth.num_images else 0.0),
                "steps": config.finetune.steps,
            })
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return [{**row, "group_peak_rss_mib": peak, "synth_seconds": synth_seconds} for row in rows]


@torch.no_grad()
def run_float(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([model.eval()(x[i : i + 1000]).argmax(1) for i in range(0, len(x), 1000)])


def summary(rows: list[dict], methods: tuple[str, ...]) -> str:
    """Markdown table: mean ± sample standard deviation over seeds, median wall time."""
    rows = [r for r in rows if r["method"] in methods]
    methods = tuple(m for m in methods if any(r["method"] == m for r in rows))
    present = {(r["model"], r["per_class"], r["bits"], r["method"]) for r in rows}
    keys = sorted(
        {(n, p, b) for n, p, b, _ in present if all((n, p, b, m) in present for m in methods)},
        key=lambda k: (k[0], k[1], -int(k[2][1]), k[2]),
    )
    lines = [header("model", "calib/class", "bits", "float", *methods, f"wall s ({' / '.join(methods)})")]
    for model, per_class, bits in keys:
        cells, walls = [], []
        for method in methods:
            found = [r for r in rows if (r["model"], r["per_class"], r["bits"], r["method"]) == (model, per_class, bits, method)]
            accs = [r["onnx_top1"] for r in found]
            spread = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
            cells.append(f"{statistics.mean(accs):.2f}{spread}" if accs else "-")
            walls.append(f"{statistics.median(r['seconds'] for r in found):.0f}" if found else "-")
        float_top1 = next(r["float_top1"] for r in rows if r["model"] == model)
        lines.append(row(model, per_class, bits, f"{float_top1:.2f}", *cells, " / ".join(walls)))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(fmnist.MODELS), default=["resnet", "mobilenet"])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--per-class", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--bits", nargs="+", default=["4/4", "8/8", "3/3", "2/4"])
    parser.add_argument("--ablate", nargs="*", default=["10:4/4", "10:2/4"],
                        help="PER_CLASS:W/A settings that also run the fddaq ablations")
    parser.add_argument("--json", type=Path, help="write every row here")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, per_class, seed = args.child
        print(json.dumps(group(model, int(per_class), int(seed), args.bits, args.methods, args.ablate)))
        return
    rows = []
    for model in args.models:
        for per_class in args.per_class:
            for seed in args.seeds:
                out = subprocess.run(
                    [sys.executable, __file__, "--child", model, str(per_class), str(seed), "--bits", *args.bits,
                     "--methods", *args.methods, "--ablate", *args.ablate],
                    check=True, stdout=subprocess.PIPE, text=True,
                )
                rows += json.loads(out.stdout.strip().splitlines()[-1])
                if args.json:
                    args.json.write_text(json.dumps(rows, indent=1))
    print(summary(rows, METHODS))
    if any(r["method"] in ABLATIONS for r in rows):
        print("\nfddaq ablations:\n" + summary(rows, ("fddaq", *ABLATIONS)))
    peaks = [r["group_peak_rss_mib"] for r in rows]
    print(f"peak RSS per group: {min(peaks):.0f}-{max(peaks):.0f} MiB; "
          f"generator training per group: {statistics.median(r['synth_seconds'] for r in rows):.0f} s (median)")


if __name__ == "__main__":
    main()
