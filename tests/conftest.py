import pytest
import torch
from torch import nn

from fddaq.config import QuantConfig
from fddaq.quant.capture import capture
from fddaq.quant.plan import resolve_layer_plan
from fddaq.quant.prepare import prepare
from tests.models import TinyResNet, randomize_bn

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(TinyResNet())


def fake_quant_model(model: nn.Module, input_shape=(1, 16, 16), **bits) -> nn.Module:
    found = capture(model, torch.zeros(1, *input_shape))
    return prepare(model, found, resolve_layer_plan(found, QuantConfig(**bits)), found.outputs[0].name)
