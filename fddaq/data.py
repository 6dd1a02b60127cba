"""Image folders (ImageFolder layout or flat) decoded into model-input tensors."""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .config import PRESETS
from .errors import ConfigError, DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
UNLABELLED = -1


MAX_UNREADABLE = 0.5  # a folder where more of the image files than this share are unreadable is refused
MAX_SIZE = 4096  # pixels: a larger crop is a typo, and one forward pass would exhaust memory


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to `resize` (none: keep), centre-crop to `input_size`, scale to
    [0, 1], then (x - mean) / std per channel. `channels` is 1 (grey) or 3 (RGB)."""

    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int
    resize: int | None = None
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ConfigError(f"channels={self.channels}: models must take 1 (grey) or 3 (RGB) channels")
        for name in ("mean", "std"):
            if len(getattr(self, name)) not in (1, self.channels):
                raise ConfigError(f"{name} has {len(getattr(self, name))} values; the model takes {self.channels} channels")
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)):
            raise ConfigError(f"mean={self.mean} and std={self.std} must be finite numbers")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"std={self.std} must be positive")
        if not 1 <= self.input_size <= MAX_SIZE:
            raise ConfigError(f"input_size={self.input_size} must be within 1..{MAX_SIZE} pixels")
        if self.resize is not None and not self.input_size <= self.resize <= 2 * MAX_SIZE:
            raise ConfigError(f"resize={self.resize} must be within input_size={self.input_size}..{2 * MAX_SIZE} pixels")
        if self.interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ConfigError(f"interpolation={self.interpolation!r} is not one of bilinear, bicubic, nearest")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one model input."""
        return (self.channels, self.input_size, self.input_size)

    def input_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The lowest and highest model-input value of each channel (pixels 0 and 1), (C, 1, 1)."""
        mean = torch.tensor(self.mean).expand(self.channels).reshape(-1, 1, 1)
        std = torch.tensor(self.std).expand(self.channels).reshape(-1, 1, 1)
        return (0 - mean) / std, (1 - mean) / std

    def describe(self) -> str:
        """One line: what happens to an image before the model sees it."""
        numbers = lambda values: ", ".join(f"{v:.4g}" for v in values)
        scale = f"shorter side to {self.resize} ({self.interpolation}), " if self.resize is not None else ""
        return (f"{scale}centre crop {self.input_size}x{self.input_size}, {'grey' if self.channels == 1 else 'RGB'}, "
                f"mean {numbers(self.mean)}, std {numbers(self.std)}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Preprocess:
        return cls(**{**data, "mean": tuple(data["mean"]), "std": tuple(data["std"])})


def preset(name: str, channels: int) -> Preprocess:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return Preprocess(channels=channels, **PRESETS[name])


@dataclass(frozen=True)
class ImageSet:
    """Decoded images (N, C, H, W) float32 in model-input space, labels (N,) int64
    (`UNLABELLED` for a flat folder), the class names indexing the labels, the image paths
    and how many files were skipped as unreadable."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]
    paths: tuple[str, ...]
    skipped: int = 0
    layout: str = ""  # how the folder was read (`describe_layout`)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def labelled(self) -> bool:
        return bool((self.labels != UNLABELLED).all())


BACKGROUND = (0, 0, 0)  # what transparent pixels are composited onto (RGB)


def _normalised(img, channels: int):
    """`img` in mode "L" / "RGB" (8-bit; `channels` 1 / 3) or "F" (one channel, floats in
    [0, 1]: images of more than 8 bits keep their precision). 16- and 32-bit integer images
    are read as 16-bit (0..65535; higher values saturate); float images as [0, 1] (as 0..255
    when a value exceeds 1), NaN as 0; an alpha channel or a transparent palette entry is
    composited onto `BACKGROUND`."""
    from PIL import Image

    if img.mode.startswith("I") or img.mode == "F":
        array = np.asarray(img, dtype=np.float32)
        scale = 65535.0 if img.mode != "F" else 255.0 if array.max(initial=0.0) > 1.0 else 1.0
        return Image.fromarray(np.clip(np.nan_to_num(array / scale), 0.0, 1.0).astype(np.float32), "F")
    if "A" in img.mode or "a" in img.mode or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba)
    return img.convert("L" if channels == 1 else "RGB")


def _decode(path: Path, preprocess: Preprocess) -> np.ndarray | None:
    """HWC float32 image in [0, 1], or None when the file is not a readable image (see
    `_normalised` for bit depths and transparency)."""
    from PIL import Image, UnidentifiedImageError

    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
    try:
        with Image.open(path) as img:
            img = _normalised(img, preprocess.channels)
            if preprocess.resize is not None:
                w, h = img.size
                ratio = preprocess.resize / min(w, h)
                img = img.resize((max(1, round(w * ratio)), max(1, round(h * ratio))), resample[preprocess.interpolation])
            size = preprocess.input_size
            w, h = img.size
            if w < size or h < size:
                raise DataError(
                    f"{path} is {w}x{h}, smaller than the {size}x{size} crop: use larger images or set `resize`"
                )
            left, top = (w - size) // 2, (h - size) // 2
            array = np.array(img.crop((left, top, left + size, top + size)), dtype=np.float32)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None  # DecompressionBombError: a header that claims more pixels than PIL's limit
    if img.mode != "F":
        array = array / 255.0
    else:  # a grey image of more than 8 bits; bicubic resizing can overshoot [0, 1]
        array = np.clip(array, 0.0, 1.0)
        if preprocess.channels == 3:
            array = np.repeat(array[:, :, None], 3, axis=2)
    return array.reshape(size, size, preprocess.channels)


def default_workers() -> int:
    """Decoding threads: the CPUs this process may use (shared by the torchrun processes on
    this machine), at most 16."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(16, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def _decode_into(
    paths: list[Path], preprocess: Preprocess, workers: int, pin_memory: bool
) -> tuple[torch.Tensor, list[int]]:
    """Decode `paths` into one (N, C, H, W) float32 tensor in model-input space (pinned when
    asked), `workers` files at a time, each written in place: peak memory is the tensor itself.
    Returns it with the indices of the readable files (unreadable ones are dropped)."""
    size, channels = preprocess.input_size, preprocess.channels
    out = torch.empty((len(paths), channels, size, size), dtype=torch.float32, pin_memory=pin_memory)
    mean = torch.tensor(preprocess.mean, dtype=torch.float32).reshape(-1, 1, 1)
    std = torch.tensor(preprocess.std, dtype=torch.float32).reshape(-1, 1, 1)

    def decode(index: int) -> bool:
        array = _decode(paths[index], preprocess)
        if array is None:
            return False
        torch.sub(torch.from_numpy(array).permute(2, 0, 1), mean, out=out[index]).div_(std)
        return True

    # PIL releases the GIL while it decodes and resizes, so threads decode in parallel
    with ThreadPoolExecutor(max(1, workers)) as pool:
        readable = [i for i, ok in enumerate(pool.map(decode, range(len(paths)))) if ok]
    if len(readable) < len(paths):
        out = out[readable].pin_memory() if pin_memory else out[readable]
    return out, readable


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


SYSTEM_FOLDERS = {"__MACOSX", "@eaDir", "$RECYCLE.BIN", "System Volume Information", "__pycache__"}


def _folders(root: Path) -> list[Path]:
    """Sub-folders that may hold images: not hidden, not made by an operating system."""
    return sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in SYSTEM_FOLDERS)


def class_folders(root: Path) -> list[Path]:
    """The class folders of an ImageFolder layout; none: a flat folder of images. A folder
    that holds images itself is flat, its sub-folders ignored when they hold none (a stray
    `holiday.jpg/`); images beside folders of images are ambiguous, and an error."""
    root = Path(root)
    folders = _folders(root)
    if folders and _list_images(root):
        filled = [p.name for p in folders if _list_images(p)]
        if filled:
            raise DataError(f"{root} holds both images and folders of images ({', '.join(filled[:3])}): give one folder "
                            "per class (DIR/<class>/<image>) or a flat folder of images")
        return []
    return folders


def describe_layout(root: Path, folders: list[Path]) -> str:
    """How `load_image_folder` reads `root` (its class `folders`), and which folders it ignores."""
    root, read = Path(root), set(folders)
    ignored = [p.name for p in sorted(root.iterdir()) if p.is_dir() and p not in read]
    text = f"{len(folders)} class folder{'s' * (len(folders) != 1)}" if folders else "a flat folder (unlabelled)"
    return text + (f"; folders ignored: {', '.join(ignored[:3])}{' ...' if len(ignored) > 3 else ''}" if ignored else "")


def load_image_folder(
    root: Path, preprocess: Preprocess, class_names: tuple[str, ...] | None = None,
    workers: int | None = None, pin_memory: bool = False,
) -> ImageSet:
    """Read `root/<class>/<image>` (labels by position of the folder name in `class_names`,
    or in the sorted folder names when None) or a flat `root/<image>` folder (unlabelled).

    Unreadable files are skipped and counted; more than `MAX_UNREADABLE` of them, or a class
    folder left without a readable image, is an error (a wrong folder, or broken files). Files are
    decoded by `workers` threads (default: `default_workers()`); `pin_memory` puts the images
    in page-locked memory, for fast asynchronous copies to a CUDA GPU."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a folder")
    folders = class_folders(root)
    if folders:
        names = tuple(p.name for p in folders) if class_names is None else tuple(class_names)
        unknown = [p.name for p in folders if p.name not in names]
        if unknown:
            raise DataError(
                f"{root} has class folders the model does not know: {', '.join(unknown[:5])} "
                f"(known: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''})"
            )
        files = [(path, names.index(folder.name)) for folder in folders for path in _list_images(folder)]
    else:
        names = tuple(class_names or ())
        files = [(path, UNLABELLED) for path in _list_images(root)]
    if not files:
        raise DataError(f"{root} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    workers = default_workers() if workers is None else workers
    images, readable = _decode_into([path for path, _ in files], preprocess, workers, pin_memory)
    if not readable:
        raise DataError(f"none of the {len(files)} files in {root} is a readable image")
    unreadable = sorted(set(range(len(files))) - set(readable))
    if len(unreadable) > MAX_UNREADABLE * len(files):
        raise DataError(f"{len(unreadable)} of the {len(files)} image files in {root} are not readable images (e.g. "
                        f"{files[unreadable[0]][0]}): fix or remove them")
    lost = sorted({files[i][1] for i in unreadable} - {files[i][1] for i in readable})
    if lost:
        raise DataError(f"class folder {names[lost[0]]} of {root} has no readable image: fix or remove its files")
    labels = torch.tensor([files[i][1] for i in readable], dtype=torch.int64)
    return ImageSet(images, labels, names, tuple(str(files[i][0]) for i in readable), len(files) - len(readable),
                    describe_layout(root, folders))
