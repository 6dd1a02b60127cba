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


@dataclass(frozen=True)
class QuantConfig:
    """Bit widths. `first_last_bits` (weights and activations of the first and last layer)
    defaults to the other layers' bits: the paper's F4L4 at `--bits 4`. `input_bits` is the
    model-input image quantizer."""

    weight_bits: int = 4
    act_bits: int = 4
    first_last_bits: int | None = None
    input_bits: int = 8

    def __post_init__(self) -> None:
        for name in ("weight_bits", "act_bits", "first_last_bits", "input_bits"):
            _check_bits(name, getattr(self, name))


@dataclass(frozen=True)
class CalibrationConfig:
    """Range calibration on the real images: MSE-optimal per-channel weight scales and
    per-tensor activation ranges from at most `max_samples` values per layer input."""

    max_samples: int = 1 << 18
    seed: int = 0

    def __post_init__(self) -> None:
        _check_positive("max_samples", self.max_samples)


@dataclass(frozen=True)
class FinetuneConfig:
    """Distillation of the fake-quant student from the float teacher (last step is kept)."""

    steps: int = 400
    batch_size: int = 32
    weight_lr: float = 2e-5
    scale_lr: float = 2e-3
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        _check_positive("steps", self.steps, allow_zero=True)
        for name in ("batch_size", "weight_lr", "scale_lr", "temperature"):
            _check_positive(name, getattr(self, name))


@dataclass(frozen=True)
class RunConfig:
    quant: QuantConfig = field(default_factory=QuantConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_json(self) -> dict:
        return asdict(self)
