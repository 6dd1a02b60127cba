"""Where torch runs (`--device auto|cpu|cuda[:i]`) and what is sped up there.

On a CUDA device the float teacher and the generator run under bfloat16 autocast (their
outputs only steer losses; BatchNorm statistics are taken in float32) and models use the
channels-last layout; fake-quant arithmetic always stays float32. Random draws stay on the
CPU's seeded generators, so a seed gives the same batches on any device."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import Tensor, nn

from .distributed import launched
from .errors import ConfigError

CHOICES = "auto, cpu, cuda or cuda:INDEX"


def resolve_device(spec: str = "auto") -> torch.device:
    """`auto`: the first CUDA GPU when torch sees one, else the CPU. Asking for a GPU that is
    not there is a `ConfigError`, never a silent fallback."""
    text = spec.strip().lower()
    if text == "auto":
        return _gpu(spec, None) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ConfigError(f"`device` {spec!r} is not one of {CHOICES}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ConfigError(f"`device` {spec!r} is not one of {CHOICES}")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"`device` {spec} was requested but torch sees no CUDA GPU here (torch {torch.__version__}): "
            "use `device` cpu, or auto to take a GPU only when there is one"
        )
    return _gpu(spec, device.index)


def _gpu(spec: str, index: int | None) -> torch.device:
    """GPU `index` (default 0); under torchrun, each process's LOCAL_RANK GPU."""
    ranks = launched()
    if ranks.world > 1:
        if index is not None:
            raise ConfigError(f"`device` {spec}: under torchrun each process takes the GPU of its LOCAL_RANK; "
                              "give `device` cuda or auto")
        index = ranks.local_rank
    count, index = torch.cuda.device_count(), index or 0
    if index >= count:
        raise ConfigError(f"`device` {spec}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", index)


def fast_float(device: torch.device) -> AbstractContextManager:
    """Autocast for float-only work (teacher, generator): bfloat16 on CUDA, off elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def place(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` moved to `device` (in place): channels-last on CUDA, contiguous elsewhere."""
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    return model.to(device).to(memory_format=layout)


@contextmanager
def placed(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """`model` on `device` while active, back where it was afterwards (nesting is safe)."""
    before = model_device(model)
    place(model, device)
    try:
        yield model
    finally:
        place(model, before)


def pin(device: torch.device) -> bool:
    """Whether images bound for `device` should sit in page-locked host memory (CUDA only)."""
    return device.type == "cuda"


def batches(images: Tensor, batch_size: int, device: torch.device) -> Iterator[Tensor]:
    """`images` in consecutive batches, on `device`. Copies from pinned memory are
    asynchronous: as long as the caller keeps its results on the device, the next batch's copy
    overlaps the current batch's compute."""
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size].to(device, non_blocking=True)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for an empty model."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")
