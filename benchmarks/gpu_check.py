"""Throughput of fddaq's two training loops on one device (issue 8): FDDA generator steps and
fake-quant fine-tuning steps, for ResNet-18 and EfficientNet-Lite0 at 224 px with random
weights (the cost does not depend on the weights), 1000 classes.

    .venv/bin/python benchmarks/gpu_check.py [--device cuda] [--models resnet18 efficientnet_lite0] [--steps 20] [--json FILE]
    benchmarks/gpu_check.sh   # the same on a GPU machine, in under 8 minutes

Both loops run through the library's own `train_generator` and `finetune` (W4A4 all layers,
the `fddaq` recipe's batch sizes: 16 per generator pass, 32 per fine-tuning step); step times
are medians over the steps after `--warmup`. For each loop: images/s, seconds per step, peak
GPU memory, the FLOPs of one step (counted by torch's FlopCounterMode: forward and backward)
and the fraction of the GPU's dense bf16 peak they reach; the forward FLOPs per image of the
model and of the generator. Then the FLOPs and projected wall time of whole runs from the
step times: the official FDDA recipe (80k generator steps; 70k student steps after the
first 10k) and fddaq's ImageNet budget (`--budget GENERATOR_STEPS FINETUNE_STEPS`).
`--device cpu --steps 3` is a smoke check.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tables import header

# dense bf16 tensor-core peaks (FLOP/s) of the GPUs this is meant for; others report none
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}
OFFICIAL = {"generator": 80_000, "finetune": 70_000}  # 400 epochs x 200 iterations; student from epoch 50
MODELS = {"resnet18": "torchvision:resnet18", "efficientnet_lite0": "fddaq:efficientnet_lite0"}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


class StepClock:
    """Progress events -> the wall time of each step of one stage."""

    def __init__(self, stage: str, device: torch.device) -> None:
        self.stage, self.device, self.times, self.last = stage, device, [], None

    def __call__(self, event) -> None:
        if event.stage != self.stage:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        if self.last is not None and event.step > 0:
            self.times.append(now - self.last)
        self.last = now


def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """FLOPs of a convolution's backward: each requested gradient (input, weight) costs what
    the forward costs. Replaces torch 2.14's formula, whose weight-gradient term ignores
    `groups` and so counts a depthwise convolution's weight gradient C times over
    (EfficientNet's fine-tuning step came out at 10.7x its real FLOPs)."""
    from torch.utils.flop_counter import conv_flop_count

    return conv_flop_count(x_shape, w_shape, grad_out_shape, transposed) * (int(output_mask[0]) + int(output_mask[1]))


def measure(run, stage: str, device: torch.device, steps: int, warmup: int) -> dict:
    """Median step time of `run(steps, on_event)`, peak memory, and the FLOPs of one step."""
    from torch.utils.flop_counter import FlopCounterMode

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock = StepClock(stage, device)
    run(warmup + steps, clock)
    seconds = statistics.median(clock.times[warmup:])
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flops})
    with counter:
        run(1, None)
    flops = counter.get_total_flops()
    return {"seconds_per_step": seconds, "flops_per_step": flops, "flops_per_s": flops / seconds, "peak_gib": peak}


@torch.no_grad()
def forward_flops_per_image(module: torch.nn.Module, *inputs: torch.Tensor) -> float:
    """FLOPs of one eval-mode forward pass, per image of the batch `inputs` describe."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        module.eval()(*inputs)
    return counter.get_total_flops() / len(inputs[0])


def check(name: str, device: torch.device, steps: int, warmup: int) -> dict:
    from dataclasses import replace

    from fddaq.config import QuantConfig, SynthConfig
    from fddaq.device import place
    from fddaq.finetune import finetune
    from fddaq.models import build_model
    from fddaq.quant.calibrate import calibrate
    from fddaq.quant.capture import capture
    from fddaq.quant.plan import resolve_layer_plan
    from fddaq.quant.prepare import prepare
    from fddaq.recipes import recipe_config
    from fddaq.stats import ClassStatistics, batchnorm_layers, image_statistics
    from fddaq.synth.generator import Generator
    from fddaq.synth.train import train_generator

    torch.manual_seed(0)
    teacher = place(build_model(MODELS[name]).eval(), device)
    shape = (3, 224, 224)
    layers = batchnorm_layers(teacher, torch.zeros(1, *shape))
    # one labelled image for every 10th class: both generator passes (random labels, one class) run
    labels = torch.arange(0, 1000, 10)
    images = torch.randn(len(labels), *shape)
    means, variances, _ = image_statistics(teacher, layers, images, batch_size=50)
    # every image counts as correctly classified: random weights misclassify nearly all, and the
    # generator's single-class pass only runs for classes with a center of correct images
    centers = ClassStatistics(means, variances, labels, torch.ones(len(labels), dtype=torch.bool), 1000)
    synth = SynthConfig()

    def generator_steps(count: int, on_event) -> None:
        result = train_generator(teacher, layers, centers, shape, replace(synth, steps=count, center_warmup=0.0), on_event)
        assert len(result.curves["cbns"]) == count, "every timed generator step must run both passes"

    config = recipe_config("fddaq", QuantConfig(4, 4))
    found = capture(teacher, torch.zeros(1, *shape, device=device))
    student = place(prepare(teacher, found, resolve_layer_plan(found, config.quant), found.outputs[0].name), device)
    calibrate(student, images[:32])
    real = (images, labels)
    synthetic = (torch.randn(256, *shape), torch.randint(1000, (256,)))

    def finetune_steps(count: int, on_event) -> None:
        tuned = replace(config.finetune, steps=count, checkpoint_every=10**9, holdout=0.0)
        finetune(student, teacher, real, tuned, synthetic, on_event)

    passes = 2  # a generator step draws a random-label batch and a single-class batch
    generator = place(Generator(1000, 3, 224, synth.latent_dim, synth.width), device)
    rows = {"forward": {
        "model_flops_per_image": forward_flops_per_image(teacher, images[:2].to(device)),
        "generator_flops_per_image": forward_flops_per_image(
            generator, torch.randn(2, synth.latent_dim, device=device), torch.arange(2, device=device)),
    }}
    for stage, run, images_per_step in (
        ("synthesize", generator_steps, passes * synth.batch_size),
        ("finetune", finetune_steps, config.finetune.batch_size),
    ):
        result = measure(run, stage, device, steps, warmup)
        rows[stage] = {**result, "images_per_s": images_per_step / result["seconds_per_step"]}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=20, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget", type=int, nargs=2, default=[5000, 10000], metavar=("GENERATOR", "FINETUNE"),
                        help="fddaq's ImageNet budget for the projection")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from fddaq.device import resolve_device

    device = resolve_device(args.device)
    peak = peak_flops(device)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    results = {name: check(name, device, args.steps, args.warmup) for name in args.models}
    if args.json:
        args.json.write_text(json.dumps({"device": label, "peak_bf16_flops": peak, "results": results}, indent=1))
    print(f"device: {label}; torch {torch.__version__}; dense bf16 peak: {peak / 1e12 if peak else 'unknown'} TFLOP/s\n")
    print(header("model", "loop", "images/s", "s/step", "GFLOP/step", "TFLOP/s", "of bf16 peak", "peak GiB"))
    for name, rows in results.items():
        for stage, r in rows.items():
            if stage == "forward":
                continue
            share = f"{100 * r['flops_per_s'] / peak:.1f}%" if peak else "-"
            memory = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
            print(f"| {name} | {stage} | {r['images_per_s']:.0f} | {r['seconds_per_step']:.4f} | "
                  f"{r['flops_per_step'] / 1e9:.1f} | {r['flops_per_s'] / 1e12:.2f} | {share} | {memory} |")
    print("\n" + header("model", "forward GFLOP per image: model", "generator"))
    for name, rows in results.items():
        forward = rows["forward"]
        print(f"| {name} | {forward['model_flops_per_image'] / 1e9:.2f} | {forward['generator_flops_per_image'] / 1e9:.2f} |")
    print("\n" + header("model", "run", "generator steps", "fine-tuning steps", "PFLOP", "projected hours"))
    for name, rows in results.items():
        gen, ft = rows["synthesize"], rows["finetune"]
        for run, (g, f) in (("official FDDA recipe", OFFICIAL.values()), ("fddaq budget", args.budget)):
            pflop = (g * gen["flops_per_step"] + f * ft["flops_per_step"]) / 1e15
            hours = (g * gen["seconds_per_step"] + f * ft["seconds_per_step"]) / 3600
            print(f"| {name} | {run} | {g} | {f} | {pflop:.1f} | {hours:.2f} |")


if __name__ == "__main__":
    main()
