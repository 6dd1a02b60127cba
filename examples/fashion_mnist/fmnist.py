"""Read the original Fashion-MNIST IDX files (Debian package `dataset-fashion-mnist`)
and write subsets as ImageFolder trees of PNG files."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = (
    "0_tshirt_top", "1_trouser", "2_pullover", "3_dress", "4_coat",
    "5_sandal", "6_shirt", "7_sneaker", "8_bag", "9_ankle_boot",
)
MEAN, STD = 0.2860, 0.3530
HERE = Path(__file__).resolve().parent
# The bundled models: name -> (weights file in this folder, fddaq zoo architecture).
MODELS = {"resnet": ("model.pth", "fashion_resnet"), "mobilenet": ("mobilenet.pth", "fashion_mobilenet")}


def model_source(name: str) -> tuple[Path, str]:
    """(weights path, `--arch` value) of bundled model `name`."""
    weights, arch = MODELS[name]
    return HERE / weights, f"fddaq:{arch}"


def read_split(split: str, data_dir: Path = DATA_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of split "train" or "t10k"."""
    images_path = data_dir / f"{split}-images-idx3-ubyte.gz"
    labels_path = data_dir / f"{split}-labels-idx1-ubyte.gz"
    if not images_path.exists():
        raise SystemExit(
            f"{images_path} not found: install it with "
            "`apt-get install dataset-fashion-mnist`"
        )
    with gzip.open(images_path) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28).copy()
    with gzip.open(labels_path) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    return images, labels


def first_per_class(labels: np.ndarray, count: int) -> np.ndarray:
    """Indices of the first `count` images of every class, in file order."""
    return np.concatenate([np.flatnonzero(labels == c)[:count] for c in range(len(CLASS_NAMES))])


def write_image_folder(images: np.ndarray, labels: np.ndarray, indices: np.ndarray, root: Path) -> None:
    """Write images[indices] as root/<class>/<index>.png."""
    from PIL import Image

    for index in indices:
        folder = root / CLASS_NAMES[labels[index]]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[index], mode="L").save(folder / f"{index:05d}.png")
