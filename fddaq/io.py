"""Atomic file writes: a crash or Ctrl-C never leaves half a file behind. Files get the
permissions `open()` would give them (0666 less the umask), and JSON is strict."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:  # an existing file keeps its mode, as open() would keep it; a new one gets 0666 less the umask
            mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o666 & ~_umask()
        os.fchmod(fd, mode)  # mkstemp makes 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (setting and
    restoring it would let another thread create a file unmasked meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def strict_json(data: object) -> object:
    """`data` with every NaN or infinite float replaced by None: JSON has no NaN, and strict
    parsers (JavaScript, jq) reject files that hold one."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: strict_json(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict_json(value) for value in data]
    return data


def atomic_write_json(path: Path, data: object) -> None:
    atomic_write_bytes(path, (json.dumps(strict_json(data), indent=2, allow_nan=False) + "\n").encode())


def png_bytes(array) -> bytes:
    """PNG encoding of a uint8 (H, W) or (H, W, 3) array."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def tensors_bytes(tensors: dict) -> bytes:
    """`torch.save` of a dict of tensors, as bytes (loads with `weights_only=True`)."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return buffer.getvalue()


def read_tensors(path: Path, what: str, error: type[Exception]) -> object:
    """What `tensors_bytes` (or `torch.save`) wrote to `path`, read without running code from it
    (`weights_only`); an `error` saying that `path` is not `what` when it is missing or unreadable."""
    import torch

    if not path.is_file():
        raise error(f"{path} does not exist ({what} is needed there)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: torch raises many types
        from .errors import first_line

        raise error(f"{path} is not {what} ({first_line(exc)})") from exc
