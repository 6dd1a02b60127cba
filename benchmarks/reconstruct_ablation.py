"""Variants of a recipe on one bundled Fashion-MNIST model, side by side, top-1 of the deployed
(folded) fake-quant model on the full 10,000-image test set (the exported ONNX computes the same:
`benchmarks/recipes.py` scores the ONNX itself). One FDDA generator per (model, images per
class, seed), trained once and shared by every variant.

    .venv/bin/python benchmarks/reconstruct_ablation.py --model mobilenet --per-class 10 --seed 0 \\
        ptq reconstruct fddaq 'fddaq,r.iterations=500' 'reconstruct,a=8' 'reconstruct,synth=1024' 'reconstruct,r.drop=0.0'

A variant is RECIPE[,KEY=VALUE...]: `w=`/`a=` weight and activation bits (default 4/4), `grid=symmetric`
the weight grid (`QuantConfig.weight_grid`), `act=all|inputs` the quantized activations
(`QuantConfig.activations`),
`r.FIELD=` a `ReconstructConfig` field, `f.FIELD=` a `FinetuneConfig` field, `c.FIELD=` a
`CalibrationConfig` field (`c.bias_images=0`: no bias correction), `s.FIELD=` a `SynthConfig`
field of the synthesis (`s.method=pool`), `synth=N` N synthetic images (the recipe's own count
otherwise: `reconstruct` 0, `fddaq` 1024). Synthetic images are made only when a variant uses
them, once per distinct synthesis setting. Needs `apt-get install dataset-fashion-mnist`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fashion_mnist"
sys.path.insert(0, str(EXAMPLE))
import fmnist


def value(text: str) -> int | float | str:
    """An option's value: a number when it reads as one, else the text (`r.FIELD=TEXT`)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main() -> None:
    from fddaq.config import QuantConfig
    from fddaq.pipeline import Source, load_inputs, quantize_inputs, synthesize
    from fddaq.recipes import recipe_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(fmnist.MODELS), default="mobilenet")
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--classes", type=int, default=10, help="calibration images of the first K classes only (the model keeps all 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("variants", nargs="+")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        calib, classes = Path(tmp) / "calib", Path(tmp) / "classes.txt"
        folders = sorted((EXAMPLE / "calib").iterdir())
        classes.write_text("\n".join(folder.name for folder in folders))
        for folder in folders[: args.classes]:
            (calib / folder.name).mkdir(parents=True)
            for png in sorted(folder.glob("*.png"))[: args.per_class]:
                shutil.copy(png, calib / folder.name / png.name)
        inputs = load_inputs(Source(*fmnist.model_source(args.model), calib, classes_file=classes))
    images, labels = fmnist.read_split("t10k")
    x = (torch.from_numpy(images).float().div(255).unsqueeze(1) - fmnist.MEAN) / fmnist.STD
    y = torch.from_numpy(labels)

    @torch.no_grad()
    def top1(model: torch.nn.Module) -> float:
        model.eval()
        return 100.0 * sum((model(x[i : i + 1000]).argmax(1) == y[i : i + 1000]).sum().item() for i in range(0, len(x), 1000)) / len(x)

    print(f"{args.model}, {args.per_class} images per class of {args.classes} classes, seed {args.seed}: float {top1(inputs.float_model):.2f}")
    syntheses = {}  # per SynthConfig
    print("| variant | top-1 | wall s (without the generator) | unit error before -> after |\n|---|---|---|---|")
    for variant in args.variants:
        recipe, *pairs = variant.split(",")
        options = dict(pair.split("=", 1) for pair in pairs)
        quant = QuantConfig(int(options.pop("w", 4)), int(options.pop("a", 4)), weight_grid=options.pop("grid", "auto"),
                            activations=options.pop("act", "auto"))
        config = recipe_config(recipe, quant, args.seed)
        reconstruct = {k[2:]: value(v) for k, v in options.items() if k.startswith("r.")}
        finetune = {k[2:]: value(v) for k, v in options.items() if k.startswith("f.")}
        calibration = {k[2:]: value(v) for k, v in options.items() if k.startswith("c.")}
        config = replace(config, reconstruct=replace(config.reconstruct, **reconstruct),
                         finetune=replace(config.finetune, **finetune),
                         calibration=replace(config.calibration, **calibration))
        if "synth" in options:
            config = replace(config, synth=replace(config.synth, num_images=int(options["synth"])))
        config = replace(config, auto_synthesis=False)  # the variant says whether it synthesizes
        uses_synthesis = config.synth.num_images > 0 and (config.finetune.steps > 0 or config.reconstruct.iterations > 0)
        synth = replace(recipe_config("fddaq", QuantConfig(), args.seed).synth,
                        **{k[2:]: value(v) for k, v in options.items() if k.startswith("s.")})
        if uses_synthesis and synth not in syntheses:
            syntheses[synth] = synthesize(inputs, synth)
            print(f"synthesis ({synth.method}): {syntheses[synth].seconds:.0f} s")
        start = time.perf_counter()
        result = quantize_inputs(inputs, config, synthesis=syntheses[synth] if uses_synthesis else None)
        seconds = time.perf_counter() - start
        errors = "-" if result.reconstruct is None else f"{result.reconstruct.loss_before:.3f} -> {result.reconstruct.loss_after:.3f}"
        print(f"| {variant} | {top1(result.model):.2f} | {seconds:.0f} | {errors} |", flush=True)


if __name__ == "__main__":
    main()
