import pytest
import torch

from fddaq import device
from fddaq.device import model_device, place, placed, resolve_device
from fddaq.errors import ConfigError


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="`device` cuda:0 was requested but torch sees no CUDA GPU"):
        resolve_device("cuda:0")
    for bad in ("gpu", "tpu", "cuda:x", ""):
        with pytest.raises(ConfigError, match="is not one of auto, cpu, cuda or cuda:INDEX"):
            resolve_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="this machine has 2 CUDA GPU.s., cuda:0 to cuda:1"):
        resolve_device("cuda:2")


def test_place_makes_weights_contiguous_off_cuda():
    model = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    assert not model.weight.is_contiguous()
    assert place(model, torch.device("cpu")) is model and model.weight.is_contiguous()
    assert model_device(torch.nn.ReLU()) == torch.device("cpu")  # no parameter: the CPU


def test_placed_moves_the_model_there_and_back_even_after_an_error(monkeypatch):
    moves = []
    monkeypatch.setattr(device, "place", lambda model, where: moves.append(where) or model)
    model = torch.nn.Conv2d(3, 4, 3)
    with pytest.raises(RuntimeError, match="inside"):
        with placed(model, torch.device("cuda", 1)) as inner:
            assert inner is model and moves == [torch.device("cuda", 1)]
            raise RuntimeError("inside")
    assert moves == [torch.device("cuda", 1), torch.device("cpu")]


