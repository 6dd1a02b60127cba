import io

import pytest
import torch

from fddaq.checkpoint import FORMAT_VERSION, ModelInfo, checkpoint_bytes, load_checkpoint
from fddaq.config import QuantConfig
from fddaq.data import preset
from fddaq.errors import ModelError
from fddaq.quant.calibrate import calibrate
from fddaq.quant.capture import capture
from fddaq.quant.fold import fold_batch_norms
from fddaq.quant.plan import resolve_layer_plan
from fddaq.quant.prepare import prepare
from fddaq.zoo.resnet import fashion_resnet

INFO = ModelInfo("fddaq:fashion_resnet", None, preset("fashion-mnist", 1), tuple("abcdefghij"))


@pytest.fixture(params=["inputs", "all"])
def quantized(request):
    torch.manual_seed(0)
    model = fashion_resnet().eval()
    found = capture(model, torch.zeros(1, 1, 28, 28))
    plan = resolve_layer_plan(found, QuantConfig(4, 4, activations=request.param))
    qmodel = prepare(model, found, plan, "logits")
    calibrate(qmodel, torch.randn(16, 1, 28, 28))
    return qmodel, plan


def test_round_trip_is_exact_and_weights_only(tmp_path, quantized):
    qmodel, plan = quantized
    path = tmp_path / "q.pt"
    path.write_bytes(checkpoint_bytes(qmodel, plan, INFO, {"config": {"steps": 3}}))
    torch.load(path, weights_only=True)  # nothing but tensors and strings
    loaded = load_checkpoint(path)
    assert loaded.plan == plan and loaded.info == INFO and loaded.recipe["config"] == {"steps": 3}
    x = torch.randn(4, 1, 28, 28)
    folded = fold_batch_norms(qmodel)  # what is stored: the deployed form
    assert loaded.model.deployed and len(loaded.model.folded_batch_norms()) == 9
    assert [site.name for site in loaded.model.sites] == [site.name for site in qmodel.sites]
    assert (plan.tensor_bits is None) == (not qmodel.sites)  # every tensor quantized: sites come back
    with torch.no_grad():
        assert torch.equal(loaded.model(x), folded(x))


def test_rejects_foreign_and_future_files(tmp_path, quantized):
    torch.save(fashion_resnet().state_dict(), tmp_path / "float.pth")
    with pytest.raises(ModelError, match="not an fddaq checkpoint"):
        load_checkpoint(tmp_path / "float.pth")
    qmodel, plan = quantized
    data = torch.load(io.BytesIO(checkpoint_bytes(qmodel, plan, INFO)), weights_only=True)
    data["recipe"] = data["recipe"].replace(f'"format_version": {FORMAT_VERSION}', '"format_version": 99')
    torch.save(data, tmp_path / "future.pt")
    with pytest.raises(ModelError, match="format 99.*re-run `fddaq quantize`"):
        load_checkpoint(tmp_path / "future.pt")
    with pytest.raises(ModelError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
