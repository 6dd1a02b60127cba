import pytest
import torch
from torch import nn

from fddaq.errors import ModelError
from fddaq.models import build_model, load_float_model, parse_arch_args, read_state_dict
from fddaq.quant.capture import capture
from fddaq.zoo.resnet import fashion_resnet


def test_loads_state_dict_weights_only(tmp_path):
    model = fashion_resnet()
    torch.save(model.state_dict(), tmp_path / "m.pth")
    loaded = load_float_model(tmp_path / "m.pth", "fddaq:fashion_resnet")
    assert not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


@pytest.mark.parametrize("key", ["state_dict", "model"])
def test_accepts_wrapped_state_dict(tmp_path, key):
    torch.manual_seed(3)
    weights = fashion_resnet().state_dict()
    torch.save({key: weights, "epoch": 3}, tmp_path / "m.pth")
    loaded = load_float_model(tmp_path / "m.pth", "fddaq:fashion_resnet").state_dict()
    assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], v) for k, v in weights.items())


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
    with pytest.raises(ModelError, match="shape mismatch: fc.weight.*`num_classes`"):
        load_float_model(tmp_path / "m.pth", "fddaq:fashion_resnet")
    assert load_float_model(tmp_path / "m.pth", "fddaq:fashion_resnet", num_classes=7).fc.out_features == 7


@pytest.mark.parametrize(
    "spec, message",
    [
        ("resnet18", "not of the form"),
        ("timm:not_a_timm_model", "unknown timm model"),
        ("./no_such_file.py:build", "architecture file no_such_file.py does not exist"),
        ("fddaq:nope", "zoo has: .*fashion_resnet"),
        ("torchvision:not_a_model", "unknown torchvision"),
        ("no_such_module_xyz:f", "cannot import module"),
        ("math:pi", "has no callable"),
    ],
)
def test_bad_arch_specs(spec, message):
    with pytest.raises(ModelError, match=message):
        build_model(spec)


def test_builds_torchvision_timm_module_and_file_specs(tmp_path, monkeypatch):
    assert isinstance(build_model("torchvision:resnet18", num_classes=3).fc, nn.Linear)
    assert build_model("fddaq.zoo.resnet:fashion_resnet").fc.out_features == 10
    assert build_model("timm:resnet18", num_classes=4).fc.out_features == 4
    segmentation = build_model("torchvision:lraspp_mobilenet_v3_large", num_classes=3)  # no backbone download
    assert segmentation.classifier.low_classifier.out_channels == 3
    # a file in the current folder, and a module there, without PYTHONPATH; dotted callables, arguments
    (tmp_path / "my_model.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self, width, num_classes=2, bias=True):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(width, num_classes, bias=bias)\n"
        "    @classmethod\n"
        "    def build(cls, width, **options):\n"
        "        return cls(width, **options)\n"
    )
    monkeypatch.chdir(tmp_path)
    net = build_model("./my_model.py:Net.build", num_classes=5, args=("7", "bias=False"))
    assert (net.fc.in_features, net.fc.out_features, net.fc.bias) == (7, 5, None)
    assert build_model("my_model:Net", args=("3",)).fc.in_features == 3


def test_arch_args_parse_literals_and_keep_order():
    assert parse_arch_args(("efficientnet-b0", "3", "image_size=224", "flag=True")) == (
        ["efficientnet-b0", 3], {"image_size": 224, "flag": True})
    with pytest.raises(ModelError, match="positional arguments come before"):
        parse_arch_args(("a=1", "b"))


def test_execution_order_follows_forward_not_registration():
    class Reordered(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 2)
            self.body = nn.Conv2d(1, 4, 3)

        def forward(self, x):
            return self.head(self.body(x).mean((2, 3)))

    assert [layer.name for layer in capture(Reordered(), torch.zeros(1, 1, 8, 8)).layers] == ["body", "head"]
