"""Architectures the project ships, by the name used in `--arch fddaq:<name>`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .efficientnet import efficientnet_lite0
from .mobilenet import fashion_mobilenet
from .resnet import fashion_resnet


@dataclass(frozen=True)
class ZooEntry:
    factory: Callable[..., nn.Module]
    preset: str  # the preprocessing preset of its weights (fddaq.data.PRESETS)


ZOO: dict[str, ZooEntry] = {
    "fashion_resnet": ZooEntry(fashion_resnet, "fashion-mnist"),
    "fashion_mobilenet": ZooEntry(fashion_mobilenet, "fashion-mnist"),
    "efficientnet_lite0": ZooEntry(efficientnet_lite0, "efficientnet-lite"),
}
