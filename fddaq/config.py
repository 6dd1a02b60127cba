"""Validated, frozen configuration of a run. Every check names the field, the value and what
is allowed, and raises `ConfigError` (a user mistake, not a bug)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import ConfigError

MIN_BITS, MAX_BITS = 2, 8


def _check_bits(name: str, value: int | None) -> None:
    if value is not None and not (MIN_BITS <= value <= MAX_BITS):
        raise ConfigError(f"{name}={value} is outside the supported {MIN_BITS}..{MAX_BITS} bits")


def _check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}={value} must be {'>= 0' if allow_zero else '> 0'}")


def _check_fields(config: object, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = (),
                  fractions: tuple[str, ...] = ()) -> None:
    """The fields of `config` named in `positive` are > 0, in `non_negative` >= 0, and in
    `fractions` within [0, 1)."""
    for name in positive:
        _check_positive(name, getattr(config, name))
    for name in non_negative:
        _check_positive(name, getattr(config, name), allow_zero=True)
    for name in fractions:
        if not 0 <= getattr(config, name) < 1:
            raise ConfigError(f"{name}={getattr(config, name)} must be within [0, 1)")


WEIGHT_GRIDS = ("auto", "symmetric")
ACTIVATIONS = ("auto", "all", "inputs")

# Preprocessing of well-known weights; `channels` is filled in from the model.
PRESETS: dict[str, dict] = {
    "fashion-mnist": dict(input_size=28, mean=(0.2860,), std=(0.3530,)),
    "imagenet": dict(input_size=224, resize=256, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    "efficientnet-lite": dict(
        input_size=224, resize=256, mean=(127 / 255,), std=(128 / 255,), interpolation="bicubic"
    ),
}


@dataclass(frozen=True)
class QuantConfig:
    """Bit widths. `first_last_bits` (weights and activations of the first and last layer)
    defaults to the other layers' bits: the paper's F4L4 at `--bits 4`. `input_bits` is the
    model-input image quantizer. `layers`: per-layer overrides "PATTERN=SPEC", applied in
    order after the rest (the last match wins): PATTERN is a module name or a shell-style
    pattern (`stages.*.conv1`), SPEC `W` (weights and input), `W/A` or `float`. `weight_grid`:
    "auto" puts weights of 4 bits and fewer on an affine grid (every level, a zero point per
    channel) and wider ones on a symmetric grid; "symmetric" puts every weight on a symmetric
    grid with zero point 0 (for hardware whose low-bit kernels take no weight zero point).
    `activations`: which activations are quantized: "inputs" of the convolution and linear
    layers only, or "all" tensors between operators (`quant.sites`: the graph integer
    runtimes chain integer kernels on); "auto" is "all" at 8-bit activations and "inputs"
    below (`all_tensors`)."""

    weight_bits: int = 4
    act_bits: int = 4
    first_last_bits: int | None = None
    input_bits: int = 8
    layers: tuple[str, ...] = ()
    weight_grid: str = "auto"
    activations: str = "auto"

    @property
    def all_tensors(self) -> bool:
        """Whether every tensor between operators is quantized (see `activations`)."""
        return self.activations == "all" or (self.activations == "auto" and self.act_bits >= 8)

    def __post_init__(self) -> None:
        for name in ("weight_bits", "act_bits", "first_last_bits", "input_bits"):
            _check_bits(name, getattr(self, name))
        if self.weight_grid not in WEIGHT_GRIDS:
            raise ConfigError(f"weight_grid={self.weight_grid!r} is not one of {', '.join(WEIGHT_GRIDS)}")
        if self.activations not in ACTIVATIONS:
            raise ConfigError(f"activations={self.activations!r} is not one of {', '.join(ACTIVATIONS)}")
        object.__setattr__(self, "layers", tuple(self.layers))
        for override in self.layers:
            parse_layer_override(override)


def parse_layer_override(text: str) -> tuple[str, int | None, int | None]:
    """"PATTERN=W", "PATTERN=W/A" or "PATTERN=float" as (pattern, weight bits, input bits);
    float is (pattern, None, None)."""
    pattern, sep, spec = text.partition("=")
    pattern, spec = pattern.strip(), spec.strip().lower()
    usage = f"layer override {text!r} must be PATTERN=BITS, PATTERN=WEIGHT_BITS/ACT_BITS or PATTERN=float (e.g. fc=8, 'stages.*'=4/8)"
    if not sep or not pattern or not spec:
        raise ConfigError(usage)
    if spec == "float":
        return pattern, None, None
    try:
        bits = [int(part) for part in spec.split("/")]
    except ValueError:
        raise ConfigError(usage) from None
    if len(bits) not in (1, 2):
        raise ConfigError(usage)
    for value in bits:
        if not MIN_BITS <= value <= MAX_BITS:
            raise ConfigError(f"layer override {text!r}: {value} bits is outside the supported {MIN_BITS}..{MAX_BITS}")
    return pattern, bits[0], bits[-1]


@dataclass(frozen=True)
class CalibrationConfig:
    """Range calibration on the real images: MSE-optimal per-channel weight scales and
    per-tensor activation ranges from at most `max_samples` values per layer input; then bias
    correction (`quant.bias`) on a seeded subset of at most `bias_images` images (0: none)."""

    max_samples: int = 1 << 18
    seed: int = 0
    bias_images: int = 128

    def __post_init__(self) -> None:
        _check_fields(self, positive=("max_samples",), non_negative=("bias_images",))


OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class FinetuneConfig:
    """Distillation of the fake-quant student from the float teacher; the last step is kept.

    Loss: kd_weight * T^2 * KL(teacher/T || student/T) + ce_weight * CE(student, labels).
    `learn_scales`: step sizes are learned (LSQ) from their calibrated values; otherwise
    weight scales follow each channel's max |w| every step and activation ranges are EMA
    min/max observers (momentum `act_ema`) during the first `observe_fraction` of the steps,
    then frozen (the official FDDA recipe). `holdout`: fraction of the calibration images of
    each class with at least 5 images kept out of training, to report accuracy while
    training (never to select anything). A state to resume from is handed out every
    `checkpoint_every` steps."""

    steps: int = 400  # optimizer steps, on a cosine learning-rate schedule
    batch_size: int = 32  # images per step (across all processes of a torchrun job)
    optimizer: str = "adam"  # or "sgd" (Nesterov when momentum > 0)
    weight_lr: float = 2e-5  # learning rate of the weights
    scale_lr: float = 2e-3  # learning rate of the log step sizes (with learn_scales)
    momentum: float = 0.9  # SGD's
    weight_decay: float = 0.0
    temperature: float = 1.0  # T of the loss
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    learn_scales: bool = True
    act_ema: float = 0.9
    observe_fraction: float = 0.01
    augment: bool = True  # a random shift and horizontal flip of each image drawn (`finetune.augment`)
    synthetic_fraction: float = 0.5  # of each batch, when synthetic images are given
    holdout: float = 0.1
    checkpoint_every: int = 50
    seed: int = 0  # of the held-out split, the batches drawn and their augmentation

    def __post_init__(self) -> None:
        _check_fields(self, positive=("batch_size", "weight_lr", "scale_lr", "temperature", "checkpoint_every"),
                      non_negative=("steps", "momentum", "weight_decay", "kd_weight", "ce_weight"),
                      fractions=("synthetic_fraction", "holdout", "act_ema"))
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer={self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if not 0 <= self.observe_fraction <= 1:
            raise ConfigError(f"observe_fraction={self.observe_fraction} must be within [0, 1]")
        if self.kd_weight == 0 and self.ce_weight == 0:
            raise ConfigError("kd_weight and ce_weight are both 0: the student would learn nothing")


@dataclass(frozen=True)
class ReconstructConfig:
    """Block-wise reconstruction (BRECQ/QDrop), after calibration and before fine-tuning: each
    unit (a residual block, the stem, the head: `quant.units`) is trained for `iterations`
    steps to reproduce the float unit's output from the input the quantized units before it
    give. Learned: each weight's rounding (AdaRound: `rounding_lr`, regulariser weight
    `round_weight` with beta falling from 20 to 2 after a `warmup` fraction), the units'
    activation step sizes (LSQ, `scale_lr` on the log step) and their layers' bias shifts
    (`bias_lr`; 0 keeps bias correction's). `drop`: QDrop's probability
    that an activation element skips its quantizer while training. A training batch holds
    `batch_size` images, fewer where they would bring more than `batch_elements` elements of
    the unit's quantized activations (units at a high resolution: their cost per step stays
    bounded, and each image brings many positions to the loss). The data: `views`
    augmented views of the real images and, when synthesized, up to as many synthetic
    images. 0 iterations turns it off."""

    iterations: int = 0
    batch_size: int = 32
    batch_elements: int = 2**22
    views: int = 512
    rounding_lr: float = 1e-2
    scale_lr: float = 1e-3
    bias_lr: float = 1e-3
    round_weight: float = 0.01
    warmup: float = 0.2
    drop: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        _check_fields(self, positive=("batch_size", "batch_elements", "views", "rounding_lr", "scale_lr"),
                      non_negative=("iterations", "round_weight", "bias_lr"), fractions=("warmup", "drop"))


SYNTH_METHODS = ("pool", "generator")
GENERATOR_OUTPUTS = ("batchnorm", "range")
BNS_SCALES = ("raw", "standardised")
LATENTS = ("fresh", "learned")


@dataclass(frozen=True)
class SynthConfig:
    """FDDA synthesis: the paper's losses (C-BNS, D-BNS, global BNS, cross-entropy) optimise
    `method` "pool", a pool of images started from augmented real images (`synth.pool`:
    `pool_lr` on the pixels of the images a step draws, `pool_noise` added at the start; the
    default: measured far more recognisable and separable, a step at a sixth to two fifths of
    the cost, benchmarks/RESULTS.md; each image is drawn about 16 times in 500 steps, so its lr is
    0.1, the lowest of 0.01 / 0.03 / 0.1 that gave every bundled setting >= 0.8x real diversity
    before the pixels were clamped to the input range; clamped, 0.64-0.85x), or train
    "generator", the paper's conditional generator (`synth.train`: `fdda-paper` and
    `data-free`, which has no real image to start a pool from). The defaults are the paper's
    losses, weights and noise; `steps` is scaled to a CPU budget. `deep_start` overrides the first deep BN
    layer (default: FDDA's rule). The paper divides the lr by 10 at 1/4, 1/2 and 3/4 of a
    schedule of 80k steps; at a budget of hundreds of steps that stops learning too early
    (a one-off check on the bundled example: the float model recognised far fewer synthetic
    images after 500 steps with decays than without), so `lr_milestones` (fractions of
    `steps`) is empty by default: a constant lr. The first `center_warmup` fraction of steps uses every
    calibration image for the centers, then misclassified images are dropped. A resumable
    state is handed out every `checkpoint_every` steps.

    Ablations of the generator (issue 17; the defaults are GDFQ's and FDDA's; measured in
    benchmarks/RESULTS.md: "learned" latents gave the best generator images, "range" the
    class fidelity without the diversity, "standardised" BNS collapsed at the paper's weights):
    `generator_output` "batchnorm" standardises the tanh output per batch (which also
    standardises every single-class batch like a mixed one), "range" maps it into the model's
    input range instead; `label_embedding` False conditions on the label through the
    conditional BatchNorms only, not z x embedding; `bns_scale` "standardised" measures every
    BNS error in units of its channel's spread (`losses.bns_loss`) instead of raw units;
    `latents` "learned" (Genie-like) gives each of the `num_images` images its own latent,
    optimised with the generator (at `pool_lr`), and draws the final images from those
    latents instead of fresh noise."""

    method: str = "pool"
    steps: int = 500
    num_images: int = 1024
    batch_size: int = 16
    lr: float = 1e-3
    pool_lr: float = 0.1
    pool_noise: float = 0.05
    lr_milestones: tuple[float, ...] = ()
    latent_dim: int = 100
    width: int = 128
    ce_weight: float = 0.5
    bns_weight: float = 0.2
    cbns_weight: float = 0.01
    dbns_weight: float = 0.9
    ce_single_weight: float = 0.5
    noise_mean_std: float = 0.5
    noise_var_std: float = 1.0
    deep_start: int | None = None
    center_warmup: float = 0.125
    checkpoint_every: int = 50
    generator_output: str = "batchnorm"
    label_embedding: bool = True
    bns_scale: str = "raw"
    latents: str = "fresh"
    seed: int = 0

    def __post_init__(self) -> None:
        for name, choices in (("method", SYNTH_METHODS), ("generator_output", GENERATOR_OUTPUTS),
                              ("bns_scale", BNS_SCALES), ("latents", LATENTS)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"unknown synthesis {name} {getattr(self, name)!r}; choices: {', '.join(choices)}")
        _check_fields(self, positive=("batch_size", "lr", "pool_lr", "latent_dim", "width", "checkpoint_every"),
                      non_negative=("steps", "num_images", "pool_noise", "ce_weight", "bns_weight", "cbns_weight",
                                    "dbns_weight", "ce_single_weight", "noise_mean_std", "noise_var_std"))
        if self.deep_start is not None and self.deep_start < 0:
            raise ConfigError(f"deep_start={self.deep_start} must be >= 0")
        if any(not 0 < f <= 1 for f in self.lr_milestones):
            raise ConfigError(f"lr_milestones={self.lr_milestones} must be fractions of the steps within (0, 1]")
        if not 0 <= self.center_warmup <= 1:
            raise ConfigError(f"center_warmup={self.center_warmup} must be within 0..1")
        if self.width < 2 or self.width % 2:
            raise ConfigError(f"width={self.width} must be an even number >= 2")

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class BudgetConfig:
    """A mixed-precision budget (`fddaq.precision`): the exported graph's size against the float
    graph's (`target_size`), or the points of top-1 agreement with the float model the user
    accepts to lose (`target_drop`), measured on a `holdout` share of each class's calibration
    images that the search calibrates nothing with. Each searched layer's weight bits come
    from `bit_choices`."""

    target_size: float | None = None
    target_drop: float | None = None
    bit_choices: tuple[int, ...] = (4, 8)
    holdout: float = 0.25

    def __post_init__(self) -> None:
        object.__setattr__(self, "bit_choices", tuple(sorted(set(self.bit_choices))))
        if (self.target_size is None) == (self.target_drop is None):
            raise ConfigError("give one budget: a target size (ratio to the float model) or a target drop (points)")
        if self.target_size is not None and not 0 < self.target_size:
            raise ConfigError(f"target size {self.target_size:g} must be a ratio above 0 (0.2: a fifth of the float model)")
        if self.target_drop is not None and not 0 <= self.target_drop <= 100:
            raise ConfigError(f"target drop {self.target_drop:g} must be 0 to 100 points")
        if not self.bit_choices or any(not MIN_BITS <= b <= MAX_BITS for b in self.bit_choices):
            raise ConfigError(f"bit choices {self.bit_choices} must be widths from {MIN_BITS} to {MAX_BITS}")
        if not 0 < self.holdout < 1:
            raise ConfigError(f"holdout={self.holdout} must be a share within (0, 1)")


def parse_bit_choices(text: str) -> tuple[int, ...]:
    """"4,8" as (4, 8)."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"bit choices {text!r} must be comma-separated widths, e.g. 4,8") from None


@dataclass(frozen=True)
class RunConfig:
    """A whole run. `real_images=False` is data-free: the generator learns from the float
    model's BatchNorm running statistics alone, and calibration and fine-tuning see only its
    synthetic images (real images may still serve to measure the result)."""

    quant: QuantConfig = field(default_factory=QuantConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    reconstruct: ReconstructConfig = field(default_factory=ReconstructConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    recipe: str = "custom"
    real_images: bool = True
    auto_synthesis: bool = False  # the run chooses whether to synthesize (`recipes.synthesis_choice`)
    budget: BudgetConfig | None = None  # weight bits chosen per layer for a budget (`fddaq.precision`)

    def __post_init__(self) -> None:
        if not self.real_images and self.synth.num_images == 0:
            raise ConfigError("a data-free run (no real images) needs synthetic images: num_images must be > 0")

    def to_json(self) -> dict:
        return asdict(self)
