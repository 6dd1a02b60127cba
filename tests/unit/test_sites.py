"""The tensors between operators a fully quantized graph quantizes (`fddaq.quant.sites`): found
on the float model, found again by the fake-quant model, each quantized once."""

import torch
import torch.nn.functional as F
from torch import nn

from fddaq.config import QuantConfig
from fddaq.quant.calibrate import calibrate_min_max
from fddaq.quant.capture import capture
from fddaq.quant.plan import resolve_layer_plan, tensor_sites
from fddaq.quant.prepare import prepare
from tests.models import TinyResNet, randomize_bn

X = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))


def test_residual_block_sites_and_ties():
    """conv-BN-ReLU: after the ReLU; conv-BN and conv into an add: after the folded BatchNorm and
    the conv's output; add ->
    ReLU6: after the clip, with its bounds; pooling; a layer reading through flatten reads the
    pool's tensor; the logits stay float; the first layer reads the image."""
    found = capture(randomize_bn(TinyResNet()), X[:2])
    sites = {site.name: site for site in found.sites}
    assert set(sites) == {":relu", "bn2:batch_norm", "short:out", "act:hardtanh", "pool:avgpool"}
    assert sites[":relu"].layer == "conv1" and sites["bn2:batch_norm"].layer == "conv2"
    assert sites["act:hardtanh"].bounds == (0.0, 6.0) and sites["act:hardtanh"].layer is None
    assert sites["act:hardtanh"].op == "hardtanh" and sites["pool:avgpool"].module == "pool"
    assert found.tied == {"conv2": ":relu", "short": ":relu", "fc": "pool:avgpool"}


class SharedRelu(nn.Module):
    """torchvision's BasicBlock: one ReLU module called twice, an in-place add and ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        out = self.relu(out)
        out = F.max_pool2d(out, 2)
        return self.head(out * 2.0)  # a product with a number: no site, no tie


def test_a_module_called_twice_and_in_place_ops():
    model = randomize_bn(SharedRelu())
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    found = capture(model, x[:2])
    assert [site.name for site in found.sites] == ["relu:relu", "bn2:batch_norm", "relu[1]:relu"]
    assert found.tied == {"conv2": "relu:relu"}  # head reads `out * 2.0`; conv1 the input


def test_data_moving_calls_keep_the_tie():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 7 * 7, 3))
    found = capture(model.eval(), X[:2])
    assert found.tied == {"4": "1:relu"}


def forward_counts(qmodel, run) -> dict[str, int]:
    """How often each site's quantizer runs in `run()`."""
    counts: dict[str, int] = {}

    def tap(owner, role, raw, quantized):
        if role == "y":
            counts[owner.name] = counts.get(owner.name, 0) + 1
        return quantized

    qmodel.tap = tap
    try:
        with torch.no_grad():
            run()
    finally:
        qmodel.tap = None
    return counts


def test_the_fake_quant_model_quantizes_each_site_once_where_it_is_computed():
    model = randomize_bn(SharedRelu())
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    found = capture(model, x[:2])
    plan = resolve_layer_plan(found, QuantConfig(8, 8))
    qmodel = prepare(model, found, plan, found.outputs[0].name)
    calibrate_min_max(qmodel, x)
    assert forward_counts(qmodel, lambda: qmodel(x)) == {"relu:relu": 1, "bn2:batch_norm": 1, "relu[1]:relu": 1}
    tied = qmodel.quant_layer("conv2")
    assert tied.tied and tied.input_quant is qmodel.sites[0]  # one quantizer, once in the state
    assert set(qmodel.activation_quantizers()) == {"conv1", "head", "relu:relu", "bn2:batch_norm", "relu[1]:relu"}
    quantized = qmodel(x)
    for site in qmodel.sites:  # switching the sites off changes the output: they are applied
        site.enabled = False
    assert not torch.equal(quantized, qmodel(x))


def test_a_replayed_module_finds_its_sites():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), randomize_bn(SharedRelu()), nn.Flatten(), nn.Linear(2 * 7 * 7, 3)).eval()
    found = capture(model, X[:2])
    qmodel = prepare(model, found, resolve_layer_plan(found, QuantConfig(8, 8)), found.outputs[0].name)
    calibrate_min_max(qmodel, X)
    block = qmodel.model[1]
    inner = {name for name in (site.name for site in found.sites) if name.startswith("1.")}
    assert inner == {"1.relu:relu", "1.bn2:batch_norm", "1.relu[1]:relu", "1.head:out"}
    inputs = torch.randn(2, 4, 14, 14)
    assert forward_counts(qmodel, lambda: qmodel.run_module(block, inputs)) == dict.fromkeys(inner, 1)


def test_plan_bits_of_sites():
    """A site gets the input bits of the layers reading it; a layer whose input bits differ
    keeps its own quantizer; a float layer's output stays float; 4-bit activations quantize
    layer inputs only unless asked."""
    found = capture(randomize_bn(TinyResNet()), X[:2])
    plan = resolve_layer_plan(found, QuantConfig(4, 4, layers=("fc=8", "conv2=4/8"), activations="all"))
    bits, tied = tensor_sites(found, plan)
    assert bits == {":relu": 8, "bn2:batch_norm": 4, "short:out": 4, "act:hardtanh": 4, "pool:avgpool": 8}
    assert tied == {"conv2": ":relu", "fc": "pool:avgpool"}  # short reads 4 bits: its own quantizer
    plan = resolve_layer_plan(found, QuantConfig(4, 4, layers=("conv1=float",), activations="all"))
    assert ":relu" not in tensor_sites(found, plan)[0]
    plan = resolve_layer_plan(found, QuantConfig(4, 4, layers=("fc=float",), activations="all"))
    assert "pool:avgpool" not in tensor_sites(found, plan)[0]  # the float layer reads it: it stays float
    assert resolve_layer_plan(found, QuantConfig(4, 4)).tensor_bits is None
    assert resolve_layer_plan(found, QuantConfig(4, 8)).tensor_bits == 8


class Swish(torch.autograd.Function):
    """EfficientNet-PyTorch's memory-efficient swish: one opaque operation."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return grad * s * (1 + x * (1 - s))


class Attention(nn.Module):
    """A conv stem, self-attention over positions (the fake-quant model enters its mode again
    inside), a residual add after it, a custom autograd function, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 4, stride=4)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.conv = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        tokens = x.flatten(2).transpose(1, 2)
        tokens = tokens + self.attention(tokens, tokens, tokens, need_weights=False)[0]
        x = Swish.apply(self.conv(tokens.transpose(1, 2).reshape(x.shape)))
        return self.head(x.mean((2, 3)))


def test_sites_after_attention_and_none_inside_a_custom_function():
    model = Attention().eval()
    found = capture(model, X[:2])
    names = [site.name for site in found.sites]
    assert ":add" in names and "conv:out" in names
    assert not [name for name in names if name.endswith(("sigmoid", "mul"))]  # inside Swish.apply
    qmodel = prepare(model, found, resolve_layer_plan(found, QuantConfig(8, 8)), found.outputs[0].name)
    calibrate_min_max(qmodel, X)
    assert forward_counts(qmodel, lambda: qmodel(X)) == dict.fromkeys(names, 1)


class ReluFunction(torch.autograd.Function):
    """A ReLU inside a custom autograd function: opaque, so not a clip a quantizer moves past."""

    @staticmethod
    def forward(ctx, x):
        return F.relu(x)

    @staticmethod
    def backward(ctx, grad):
        return grad  # not ReLU's gradient: no test runs a backward pass through it


class NormFunction(torch.autograd.Function):
    """A BatchNorm inside a custom autograd function: opaque, so not folded into the conv."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var):
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, 1e-5)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None  # no test runs a backward pass through it


class ClipInsideFunction(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(ReluFunction.apply(self.conv(x)))


def test_a_clip_inside_a_custom_function_is_not_fused():
    """Regression: the layer's site moved past the unnamed ReLU inside the function and came
    out with no name."""
    model = ClipInsideFunction().eval()
    found = capture(model, X[:2])
    assert [(site.name, site.op) for site in found.sites] == [("conv:out", "out")]
    qmodel = prepare(model, found, resolve_layer_plan(found, QuantConfig(8, 8)), found.outputs[0].name)
    calibrate_min_max(qmodel, X)
    assert forward_counts(qmodel, lambda: qmodel(X)) == {"conv:out": 1}


class NormInsideFunction(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        bn = self.bn
        return self.head(NormFunction.apply(self.conv(x), bn.weight, bn.bias, bn.running_mean, bn.running_var))


def test_a_batch_norm_inside_a_custom_function_is_not_folded():
    """Regression: it was folded into the conv, but the fake-quant model cannot make a call
    inside the function the identity: the deployed model differed from the fake-quant one."""
    from fddaq.quant.fold import fold_batch_norms

    model = randomize_bn(NormInsideFunction())
    found = capture(model, X[:2])
    assert found.folds == () and [site.name for site in found.sites] == ["conv:out"]
    qmodel = prepare(model, found, resolve_layer_plan(found, QuantConfig(8, 8)), found.outputs[0].name)
    calibrate_min_max(qmodel, X)
    with torch.no_grad():
        assert torch.equal(qmodel(X), fold_batch_norms(qmodel)(X))


def test_folding_keeps_each_quantizer_on_its_tensor():
    """A site after a folded BatchNorm quantizes the BatchNorm's output before folding (the call
    runs) and after (it is the identity): calibrated, trained and deployed on the same values.
    A quantizer of the conv's output would see other values once folded."""
    from fddaq.quant.fold import fold_batch_norms

    model = randomize_bn(SharedRelu())
    x = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    found = capture(model, x[:2])
    qmodel = prepare(model, found, resolve_layer_plan(found, QuantConfig(8, 8)), found.outputs[0].name)
    calibrate_min_max(qmodel, x)
    with torch.no_grad():
        before, after = qmodel(x), fold_batch_norms(qmodel)(x)
    assert (before - after).abs().max() < 0.05 * before.abs().max()


def test_training_through_sites_that_model_code_changes_in_place():
    """`out = bn2(conv2(x)); out += identity`: the site's quantized value is changed in place;
    the backward pass still reaches every step size and weight."""
    model = randomize_bn(SharedRelu())
    x = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    found = capture(model, x[:2])
    qmodel = prepare(model, found, resolve_layer_plan(found, QuantConfig(8, 8)), found.outputs[0].name)
    calibrate_min_max(qmodel, x)
    qmodel(x).square().mean().backward()
    assert all(site.log_scale.grad is not None and site.log_scale.grad.abs().sum() > 0 for site in qmodel.sites)
    assert qmodel.model.conv2.weight.grad is not None and qmodel.model.conv2.weight.grad.abs().sum() > 0
