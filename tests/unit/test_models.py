import pytest
import torch
from torch import nn

from fddaq.errors import ModelError
from fddaq.models import build_model, layer_execution_order, load_float_model, read_state_dict
from fddaq.zoo.resnet import fashion_resnet


def test_loads_state_dict_weights_only(tmp_path):
    model = fashion_resnet()
    torch.save(model.state_dict(), tmp_path / "m.pth")
    loaded = load_float_model(tmp_path / "m.pth", "fddaq:fashion_resnet")
    assert not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_accepts_wrapped_state_dict(tmp_path):
    torch.save({"state_dict": fashion_resnet().state_dict(), "epoch": 3}, tmp_path / "m.pth")
    load_float_model(tmp_path / "m.pth", "fddaq:fashion_resnet")


def test_refuses_pickled_module(tmp_path):
    torch.save(fashion_resnet(), tmp_path / "whole.pth")
    with pytest.raises(ModelError, match="pickles Python objects.*state_dict"):
        read_state_dict(tmp_path / "whole.pth")


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelError, match="not a readable PyTorch file"):
        read_state_dict(tmp_path / "junk.pth")


def test_mismatch_names_the_keys(tmp_path):
    state = fashion_resnet().state_dict()
    state.pop("fc.bias")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "m.pth")
    with pytest.raises(ModelError, match=r"missing: fc\.bias.*unexpected: extra\.weight"):
        load_float_model(tmp_path / "m.pth", "fddaq:fashion_resnet")


def test_num_classes_shape_mismatch_hints(tmp_path):
    torch.save(fashion_resnet(num_classes=7).state_dict(), tmp_path / "m.pth")
    with pytest.raises(ModelError, match="shape mismatch: fc.weight.*--num-classes"):
        load_float_model(tmp_path / "m.pth", "fddaq:fashion_resnet")
    assert load_float_model(tmp_path / "m.pth", "fddaq:fashion_resnet", num_classes=7).fc.out_features == 7


@pytest.mark.parametrize(
    "spec, message",
    [
        ("resnet18", "not of the form"),
        ("fddaq:nope", "zoo has: .*fashion_resnet"),
        ("torchvision:not_a_model", "unknown torchvision"),
        ("no_such_module_xyz:f", "cannot import module"),
        ("math:pi", "has no callable"),
    ],
)
def test_bad_arch_specs(spec, message):
    with pytest.raises(ModelError, match=message):
        build_model(spec)


def test_builds_torchvision_and_module_specs():
    assert isinstance(build_model("torchvision:resnet18", num_classes=3).fc, nn.Linear)
    assert build_model("fddaq.zoo.resnet:fashion_resnet").fc.out_features == 10


def test_execution_order_follows_forward_not_registration():
    class Reordered(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 2)
            self.body = nn.Conv2d(1, 4, 3)

        def forward(self, x):
            return self.head(self.body(x).mean((2, 3)))

    assert layer_execution_order(Reordered(), torch.zeros(1, 1, 8, 8)) == ["body", "head"]
