"""Named recipes: how calibration, synthesis and fine-tuning are configured.

- `reconstruct` (default): calibration, then block-wise reconstruction (BRECQ/QDrop: AdaRound
  rounding and LSQ activation steps, unit by unit against the float model: `fddaq.reconstruct`)
  on augmented views of the real images, plus FDDA synthetic images when `synthetic` asks for
  them or `synthesis_choice` finds that they pay (see `PAYS`); no end-to-end fine-tuning.
  `steps` is its iterations per unit.
- `fddaq`: learned step sizes (LSQ) initialised by MSE calibration on the real images,
  KD-only loss at T=1, Adam, BatchNorm frozen, per-image augmentation of real images, mixed
  1:1 with FDDA synthetic images when asked for or where `PAYS` says they pay.
- `fdda-paper`: the official FDDA student recipe at a step budget: alpha*T^2*KL + CE with
  T=20, alpha=20; SGD with Nesterov momentum 0.9, weight decay 1e-4, lr 1e-6, cosine; weight
  scales from each channel's max |w| every step (symmetric, as exported; the official code is
  asymmetric); activation ranges from EMA(0.9) min/max over the first 1% of the steps, then
  frozen; real:synthetic 1:1. Official bugs fixed: augmentation is per image and applies to
  both sources, the cosine schedule spans exactly the steps run, and the last step is kept
  (the official code selects the best of ~350 evaluations on the validation set).
  Its synthetic images come from the paper's generator; the other recipes optimise a pool of
  images started from the real ones (`fddaq.synth.pool`) with the same losses.
- `ptq`: calibration only (MSE ranges on the real images), no synthesis, no fine-tuning.
- `data-free`: no real image is used. The generator learns from the float model's BatchNorm
  running statistics and its class labels alone (FDDA's global BNS and CE losses: the GDFQ
  baseline the paper improves on); calibration and the `fddaq` fine-tuning see only its
  images. Real images, when given, only measure the result.
"""

from __future__ import annotations

from dataclasses import replace

from .config import CalibrationConfig, FinetuneConfig, QuantConfig, ReconstructConfig, RunConfig, SynthConfig
from .errors import ConfigError

RECIPES = ("reconstruct", "fddaq", "fdda-paper", "ptq", "data-free")
DEFAULT_RECIPE = RECIPES[0]
SYNTH_RECIPES = ("fddaq", "fdda-paper", "data-free")  # the recipes whose synthesis differs
RECONSTRUCT_ITERATIONS = 500


def recipe_config(
    name: str,
    quant: QuantConfig,
    seed: int = 0,
    steps: int | None = None,
    synthetic: int | None = None,
    synth_steps: int | None = None,
    synth_method: str | None = None,
) -> RunConfig:
    """The configuration of recipe `name`; given values override the recipe's. `steps`: the
    recipe's training steps (fine-tuning steps; reconstruction iterations per unit for
    `reconstruct`); 0 leaves calibration only."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; recipes: {', '.join(RECIPES)}")
    finetune = FinetuneConfig(seed=seed)
    if name == "fdda-paper":
        finetune = replace(
            finetune, optimizer="sgd", weight_lr=1e-6, momentum=0.9, weight_decay=1e-4, temperature=20.0,
            kd_weight=20.0, ce_weight=1.0, learn_scales=False, act_ema=0.9, observe_fraction=0.01,
        )
    synth = SynthConfig(seed=seed, method="generator" if name in ("fdda-paper", "data-free") else "pool")
    reconstruct = ReconstructConfig(seed=seed)
    if name == "reconstruct":
        reconstruct = replace(reconstruct, iterations=RECONSTRUCT_ITERATIONS if steps is None else steps)
        finetune = replace(finetune, steps=0)
        synth = replace(synth, num_images=0)
        steps = None
    if name == "ptq":
        finetune = replace(finetune, steps=0)
        synth = replace(synth, num_images=0)
    if name == "data-free":
        synth = replace(synth, cbns_weight=0.0, dbns_weight=0.0, ce_single_weight=0.0)
        finetune = replace(finetune, holdout=0.0)  # no real image to hold out
    if steps is not None:
        finetune = replace(finetune, steps=steps)
    if synthetic is not None:
        synth = replace(synth, num_images=synthetic)
    if synth_steps is not None:
        synth = replace(synth, steps=synth_steps)
    if synth_method is not None:
        synth = replace(synth, method=synth_method)
    return RunConfig(quant=quant, calibration=CalibrationConfig(seed=seed), synth=synth, reconstruct=reconstruct,
                     finetune=finetune, recipe=name, real_images=name != "data-free",
                     auto_synthesis=synthetic is None and name in AUTO_SYNTHESIS)


AUTO_SYNTHESIS = ("reconstruct", "fddaq")  # recipes that choose whether to synthesize from the run's images

# (reconstructs, setting) -> (synthesize?, the measurement behind it): benchmarks/RESULTS.md,
# "Where synthetic images pay, with the pixels clamped" (1,024 pool images against real images
# alone, both bundled models, W4A4, top-1 on the 10,000 test images, mean over 3 seeds, per-seed
# differences in brackets); setting "one" (fewer than 2 images per class), "many", or "few"
# (some class has no calibration image).
PAYS = {
    (True, "one"): (False, "the pool's images measured +0.00 (MobileNet) and -0.04 (ResNet) points for block "
                           "reconstruction (3 seeds): not worth their synthesis time"),
    (True, "many"): (False, "the pool's images measured +0.10 (MobileNet: +0.21 / +0.21 / -0.12) and +0.08 (ResNet: "
                            "+0.23 / -0.18 / +0.19) points for block reconstruction (3 seeds): within noise"),
    (True, "few"): (False, "the pool's images (of those classes only) measured -0.46 points for block reconstruction "
                           "(3 seeds, 3 of 10 classes covered; the generator's, of every class, +0.14)"),
    (False, "one"): (True, "the pool's images measured +0.34 points for end-to-end fine-tuning (MobileNet, 3 seeds: "
                           "-0.12 / +0.40 / +0.75)"),
    (False, "many"): (True, "the pool's images measured +0.32 points for end-to-end fine-tuning (MobileNet, 3 seeds: "
                            "+0.38 / +0.28 / +0.31)"),
    (False, "few"): (False, "the pool would add images of the covered classes only, which cost block reconstruction "
                            "0.46 points with 3 of 10 classes covered (not measured for end-to-end fine-tuning)"),
}


def synthesis_choice(config: RunConfig, images_per_class: float, covered: int, classes: int) -> tuple[RunConfig, str]:
    """Whether `config` synthesizes, chosen from what the run sees (when `auto_synthesis`):
    the configuration to run and why, from issue 17's table of where FDDA's images pay
    (benchmarks/RESULTS.md, "Where synthetic images pay"). `images_per_class`: real
    calibration images per covered class; `covered` of `classes` classes have one."""
    trains = config.finetune.steps > 0 or config.reconstruct.iterations > 0
    if not config.auto_synthesis or not trains:
        count = config.synth.num_images if trains or not config.real_images else 0
        told = "set by the recipe and the options"
        config = replace(config, synth=replace(config.synth, num_images=count), auto_synthesis=False)
        return config, f"{count} synthetic images, {told}" if count else f"no synthetic images, {told}"
    setting = "few" if covered < classes else "one" if images_per_class < 2 else "many"
    reconstructs = config.reconstruct.iterations > 0
    use = PAYS[reconstructs, setting][0]
    seen = {"few": f"{covered} of {classes} classes have calibration images",
            "one": f"{images_per_class:.3g} calibration image per class", "many": f"{images_per_class:.3g} calibration images per class"}
    why = f"{seen[setting]}; {PAYS[reconstructs, setting][1]}"
    synth = replace(config.synth, num_images=(config.synth.num_images or SynthConfig().num_images) if use else 0)
    return replace(config, synth=synth, auto_synthesis=False), ("FDDA images: " if use else "no FDDA images: ") + why
