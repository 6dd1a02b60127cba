"""Cost of one fake-quant fine-tuning step relative to one float training step on the same batch.

    .venv/bin/python benchmarks/step_cost.py [--rounds 3] [--steps 15] [--warmup 5] [--threads 2]
        [--allocator both|default|fixed] [--only fashion32,fashion128,mobile32,resnet18_64px16]

A training step is the body of the `fddaq.finetune.finetune` loop without the data pipeline:
forward, `student_loss` against teacher logits, `zero_grad`, backward, optimizer step. Both
students are in eval mode with frozen BatchNorm (as in `finetune`). The fake-quant student is
`prepare`d at W4A4 (the first layer's input at 8 bits), calibrated on the batch (`calibrate`)
and trained by `finetune`'s own optimizer (Adam over the conv/linear weights and biases, plus
the quantizers' log-scales); the float student by the same Adam over the same weights.

Variants (columns):

- ``float``: the float student (a copy of the teacher).
- ``fq (autograd)``: the fake-quant student with `reference_fake_quant` below, a copy of the
  `fake_quant` before the custom autograd Function (a composition of autograd ops), patched
  into `fddaq.quant.modules`.
- ``fq``: the fake-quant student with the current `fddaq.quant.primitives.fake_quant`.

Each is timed bare ("student step") and with the no-grad teacher forward that every real
fine-tuning step also runs ("teacher fwd + step"). Every (case, variant) runs in a fresh
process, the variants one after the other for `--rounds` rounds (order rotated each round), as
fine-tuning runs one student per process. Reported: the median over all rounds of single-step
wall times (`--steps` per round, after `--warmup` steps), and ratios of those medians to
``float``. Models, batch and labels are seeded; the timings vary with the machine and its load
(the load average is printed).

CPU step times also depend on glibc's allocator: with its default dynamic thresholds a step
can give its large blocks back to the kernel and page them in again (thousands of minor page
faults per step, printed below each table), which costs float and fake-quant steps alike and
varies with what else the process holds. ``--allocator`` runs the workers with the default
allocator, with fixed thresholds (``MALLOC_MMAP_THRESHOLD_`` 64 MiB, ``MALLOC_TRIM_THRESHOLD_``
256 MiB: no page faults, the compute-only comparison), or both (the default), one table each.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tables import header

from fddaq.config import CalibrationConfig, FinetuneConfig, QuantConfig
from fddaq.finetune import _optimizer, student_loss
from fddaq.quant import modules as fq_modules
from fddaq.quant.calibrate import calibrate
from fddaq.quant.capture import capture
from fddaq.quant.plan import resolve_layer_plan
from fddaq.quant.prepare import prepare
from fddaq.zoo.mobilenet import fashion_mobilenet
from fddaq.zoo.resnet import fashion_resnet

VARIANTS = ("float", "fq (autograd)", "fq")
ALLOCATORS = {
    "default": {},
    "fixed": {"MALLOC_MMAP_THRESHOLD_": str(64 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)},
}
CASES = {
    # name: (architecture, input shape (C, H, W), batch size)
    "fashion32": ("fashion_resnet", (1, 28, 28), 32),
    "fashion128": ("fashion_resnet", (1, 28, 28), 128),
    "mobile32": ("fashion_mobilenet", (1, 28, 28), 32),  # depthwise convs, affine 4-bit weights
    "resnet18_64px16": ("resnet18", (3, 64, 64), 16),
}


def reference_fake_quant(x: Tensor, scale: Tensor, zero_point, qmin: int, qmax: int) -> Tensor:
    """`fake_quant` as it was before the custom autograd Function: autograd ops only."""
    v = x / scale
    q = torch.clamp(v + (torch.round(v) - v).detach() + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def build_model(arch: str) -> nn.Module:
    if arch == "fashion_resnet":
        return fashion_resnet()
    if arch == "fashion_mobilenet":
        return fashion_mobilenet()
    import torchvision

    return torchvision.models.resnet18(num_classes=10)


def freeze_bn(model: nn.Module) -> nn.Module:
    """What `finetune` does to its student."""
    model.eval()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.requires_grad_(False)
    return model


def float_optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
    """`finetune`'s Adam (weight group) over the float student's conv/linear weights and biases."""
    params = [
        p for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
        for p in (m.weight, m.bias) if p is not None
    ]
    return torch.optim.Adam([{"params": params, "lr": config.weight_lr}], weight_decay=config.weight_decay)


def worker(case: str, variant: str, steps: int, warmup: int, threads: int) -> dict:
    """Time `steps` student steps of one variant, bare then with the teacher forward."""
    torch.set_num_threads(threads)
    arch, shape, batch_size = CASES[case]
    config = FinetuneConfig()
    torch.manual_seed(0)
    teacher = build_model(arch).eval()
    generator = torch.Generator().manual_seed(1)
    batch = torch.randn(batch_size, *shape, generator=generator)
    labels = torch.randint(10, (batch_size,), generator=generator)
    with torch.no_grad():
        fixed_target = teacher(batch)
    if variant == "float":
        student = freeze_bn(copy.deepcopy(teacher))
        optimizer = float_optimizer(student, config)
    else:
        found = capture(teacher, torch.zeros(1, *shape))
        student = prepare(teacher, found, resolve_layer_plan(found, QuantConfig(weight_bits=4, act_bits=4)), "logits")
        calibrate(student, batch, CalibrationConfig(max_samples=1 << 16))
        freeze_bn(student)
        optimizer = _optimizer(student, config)
        if variant == "fq (autograd)":
            fq_modules.fake_quant = reference_fake_quant

    def step(with_teacher: bool) -> None:
        if with_teacher:
            with torch.no_grad():
                target = teacher(batch)
        else:
            target = fixed_target
        loss = student_loss(student(batch), target, labels, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    result = {}
    for with_teacher in (False, True):
        for _ in range(warmup):
            step(with_teacher)
        times, faults = [], []
        for _ in range(steps):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            step(with_teacher)
            times.append(time.perf_counter() - start)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        result["teacher" if with_teacher else "bare"] = {"times": times, "faults": faults}
    return result


def run_worker(case: str, variant: str, allocator: str, args: argparse.Namespace) -> dict:
    command = [
        sys.executable, __file__, "--worker", case, variant, "--steps", str(args.steps),
        "--warmup", str(args.warmup), "--threads", str(args.threads),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | ALLOCATORS[allocator]
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_table(allocator: str, args: argparse.Namespace) -> None:
    print(f"Allocator: {allocator}{''.join(f', {k}={v}' for k, v in ALLOCATORS[allocator].items())}; "
          f"load average before: {os.getloadavg()[0]:.2f}")
    print()
    print(header("case", "step", "float (ms)", "fq (autograd) (ms)", "fq (ms)", "fq (autograd) / float", "fq / float"))
    notes = []
    for case in args.only.split(","):
        samples = {v: {mode: {"times": [], "faults": []} for mode in ("bare", "teacher")} for v in VARIANTS}
        for r in range(args.rounds):
            order = VARIANTS[r % len(VARIANTS):] + VARIANTS[: r % len(VARIANTS)]
            for variant in order:
                for mode, data in run_worker(case, variant, allocator, args).items():
                    for key in ("times", "faults"):
                        samples[variant][mode][key] += data[key]
        for mode, label in (("bare", "student step"), ("teacher", "teacher fwd + student step")):
            ms = {v: statistics.median(samples[v][mode]["times"]) * 1e3 for v in VARIANTS}
            print(
                f"| {case} | {label} | {ms['float']:.2f} | {ms['fq (autograd)']:.2f} | {ms['fq']:.2f} | "
                f"{ms['fq (autograd)'] / ms['float']:.2f}x | {ms['fq'] / ms['float']:.2f}x |",
                flush=True,
            )
            faults = "/".join(f"{statistics.median(samples[v][mode]['faults']):.0f}" for v in VARIANTS)
            notes.append(f"{case} {'bare' if mode == 'bare' else 'with teacher'} {faults}")
    print()
    print(f"Minor page faults per step, median (float/fq (autograd)/fq): {'; '.join(notes)}. "
          f"Load average after: {os.getloadavg()[0]:.2f}.")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15, help="timed steps per process and mode")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every process")
    parser.add_argument("--allocator", choices=["both", *ALLOCATORS], default="both")
    parser.add_argument("--only", default=",".join(CASES), help="comma-separated subset of " + ", ".join(CASES))
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps, args.warmup, args.threads)))
        return

    print(f"`.venv/bin/python benchmarks/step_cost.py {' '.join(sys.argv[1:])}`".replace(" `", "`"))
    print()
    print(
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"torch {torch.__version__}, "
        f"torch.set_num_threads({args.threads}); median of {args.rounds} rounds x {args.steps} steps "
        f"(after {args.warmup} warm-up steps), one fresh process per case, variant and round."
    )
    print()
    for allocator in ALLOCATORS if args.allocator == "both" else [args.allocator]:
        run_table(allocator, args)


if __name__ == "__main__":
    main()
