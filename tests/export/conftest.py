"""Fixtures of the export tests; the helpers live in `export_helpers` (importable by tests)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from export_helpers import quantize_model
from torch import Tensor, nn

from tests.models import ExportResNet, randomize_bn


@pytest.fixture
def images() -> Tensor:
    return torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def export_resnet() -> Callable[..., nn.Module]:
    """Factory: a seeded ExportResNet with random BatchNorm statistics, in eval mode."""

    def build() -> nn.Module:
        torch.manual_seed(0)
        return randomize_bn(ExportResNet())

    return build


@pytest.fixture
def quantized() -> Callable[..., nn.Module]:
    """Factory: `quantize_model(model, images, weight_bits, act_bits)` (the model input at 8 bits)."""
    return quantize_model
