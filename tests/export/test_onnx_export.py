"""QDQ/float ONNX export: parity with onnxruntime, INT4 storage, BatchNorm folding, errors."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from export_helpers import quantize_model
from onnx import TensorProto, numpy_helper
from torch import Tensor, nn

from exporters import export_float, export_qdq, run_onnx
from fddaq.errors import ExportError
from fddaq.quant.capture import capture
from fddaq.quant.fold import fold_batch_norms
from fddaq.zoo.resnet import fashion_resnet
from tests.models import randomize_bn


@torch.no_grad()
def torch_logits(model: nn.Module, images: Tensor) -> np.ndarray:
    return model.eval()(images).numpy()


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {tensor.name: tensor for tensor in model.graph.initializer}


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_qdq_graph_reproduces_fake_quant_model(export_resnet, quantized, images, bits):
    qmodel = quantized(export_resnet(), images, bits, bits)
    onnx_model = export_qdq(qmodel)
    expected = torch_logits(fold_batch_norms(qmodel), images)  # the exported form

    plain = run_onnx(onnx_model, images, optimize=False)
    assert (plain.argmax(1) == expected.argmax(1)).all()
    np.testing.assert_allclose(plain, expected, rtol=0, atol=1e-6)

    # biases are int32 already, so onnxruntime's optimizations change no arithmetic
    optimized = run_onnx(onnx_model, images, optimize=True)
    assert (optimized.argmax(1) == expected.argmax(1)).all()
    np.testing.assert_allclose(optimized, expected, rtol=0, atol=1e-5)


def test_float_export_matches_torch(export_resnet, images):
    model = export_resnet()
    onnx_model = export_float(model, (3, 16, 16))
    np.testing.assert_allclose(run_onnx(onnx_model, images), torch_logits(model, images), rtol=1e-4, atol=1e-5)
    assert {"QuantizeLinear", "DequantizeLinear", "BatchNormalization"}.isdisjoint(n.op_type for n in onnx_model.graph.node)
    assert not [n.name for n in onnx_model.graph.node if n.name]  # terse: no node names, no generated tensor names
    assert all(len(name) < 24 for node in onnx_model.graph.node for name in node.output)


class LayerZoo(nn.Module):
    """Every other supported layer form: grouped/dilated/'same' convolutions, a BatchNorm that
    cannot be folded, MaxPool, Hardtanh, Dropout/Identity, functional and method calls."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=(1, 2), padding=(1, 2), bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding="same", dilation=2, groups=8)
        self.pointwise = nn.Conv2d(8, 8, 1, padding="valid")
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.avg = nn.AvgPool2d(2, padding=1, count_include_pad=False)
        self.clip = nn.Hardtanh(-0.5, 1.5)
        self.drop = nn.Dropout(0.3)
        self.identity = nn.Identity()
        self.fc = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        y = torch.relu(self.bn(x)) + x  # x feeds the BN and the sum: no folding
        y = self.pool(self.depthwise(y).relu())
        y = self.clip(torch.add(self.pointwise(y), y))
        y = self.identity(self.drop(F.adaptive_avg_pool2d(self.avg(y), output_size=(1, 1))))
        return self.fc(y.view(y.size(0), -1))


@pytest.mark.parametrize("quantize", [False, True])
def test_layer_forms_export(images, quantize):
    torch.manual_seed(0)
    model = randomize_bn(LayerZoo())
    if quantize:
        model = fold_batch_norms(quantize_model(model, images, 4, 4))
    onnx_model = export_qdq(model) if quantize else export_float(model, (3, 16, 16))
    np.testing.assert_allclose(run_onnx(onnx_model, images), torch_logits(model, images), rtol=1e-4, atol=1e-5)
    ops = {node.op_type for node in onnx_model.graph.node}
    assert {"BatchNormalization", "MaxPool", "AveragePool", "GlobalAveragePool", "Gemm"} <= ops
    assert ("QuantizeLinear" in ops) == quantize


class Gates(nn.Module):
    """The functional and method forms of mobile activations and gates: Hardswish, a
    Hardsigmoid squeeze-excite scale, SiLU, a sigmoid gate, products with a number."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.squeeze = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = F.hardswish(self.conv(x))
        x = torch.mul(F.hardsigmoid(self.squeeze(F.adaptive_avg_pool2d(x, 1))), x)
        x = F.silu(x) * x.sigmoid() * 0.5
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize("quantize", [False, True])
def test_mobile_activation_forms_export(images, quantize):
    torch.manual_seed(0)
    model = Gates().eval()
    if quantize:
        model = fold_batch_norms(quantize_model(model, images, 8, 8))
    onnx_model = export_qdq(model) if quantize else export_float(model, (3, 16, 16))
    np.testing.assert_allclose(run_onnx(onnx_model, images), torch_logits(model, images), rtol=1e-4, atol=1e-5)
    ops = {node.op_type for node in onnx_model.graph.node}
    assert {"HardSigmoid", "Sigmoid", "Mul"} <= ops
    # quantized, hard-swish is its gate and a product, as onnxruntime runs it
    assert ("HardSwish" in ops) != quantize


def conv_batch_norm_pairs(model: nn.Module) -> dict[str, nn.BatchNorm2d]:
    """Conv name -> the BatchNorm registered right after it (how SmallResNet pairs them)."""
    modules = list(model.named_modules())
    return {
        name: following
        for (name, module), (_, following) in zip(modules, modules[1:])
        if isinstance(module, nn.Conv2d) and isinstance(following, nn.BatchNorm2d)
    }


def unpack_int4(raw: bytes, count: int) -> np.ndarray:
    """Two's-complement nibbles, the first value of each byte in the low nibble."""
    nibbles = np.stack([np.frombuffer(raw, np.uint8) & 0x0F, np.frombuffer(raw, np.uint8) >> 4], axis=1)
    values = nibbles.reshape(-1)[:count].astype(np.int8)
    return np.where(values > 7, values - 16, values)


def test_4bit_weights_are_int4_initializers_only():
    torch.manual_seed(0)
    model = randomize_bn(fashion_resnet())
    pairs = conv_batch_norm_pairs(model)
    assert len(pairs) == 9
    for bn in pairs.values():
        with torch.no_grad():
            bn.weight[::3] *= -1  # negative gammas flip the stored integers
    images = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    qmodel = quantize_model(model, images, 4, 4)
    onnx_model = export_qdq(qmodel)
    tensors = initializers(onnx_model)
    dequantized = {node.input[0]: node for node in onnx_model.graph.node if node.op_type == "DequantizeLinear"}
    float_shapes = {tuple(t.dims) for t in tensors.values() if t.data_type == TensorProto.FLOAT}

    assert len(qmodel.layers) == 10
    levels = set()
    for layer in qmodel.layers:
        name, weight = layer.name, qmodel.model.get_submodule(layer.name).weight
        stored = tensors[f"{name}.w_q"]
        expected = layer.weight_quant.quantize(weight).numpy()
        zero_point = layer.weight_quant.zero_point.numpy()
        if name in pairs:  # a negative gamma stores -1 - q, with zero point -1 - zp (the affine grid)
            negative = (pairs[name].weight.detach() < 0).numpy()
            expected = np.where(negative.reshape(-1, *[1] * (expected.ndim - 1)), -1 - expected, expected)
            zero_point = np.where(negative, -1 - zero_point, zero_point)
        assert stored.data_type == TensorProto.INT4
        assert len(stored.raw_data) == (expected.size + 1) // 2
        np.testing.assert_array_equal(unpack_int4(stored.raw_data, expected.size), expected.reshape(-1))
        np.testing.assert_array_equal(numpy_helper.to_array(stored).astype(np.int8), expected)
        node = dequantized[stored.name]
        assert [a.i for a in node.attribute if a.name == "axis"] == [0]
        stored_zero_point = tensors[node.input[2]]  # per-channel INT4 zero points
        assert stored_zero_point.data_type == TensorProto.INT4
        np.testing.assert_array_equal(numpy_helper.to_array(stored_zero_point).astype(np.int8), zero_point)
        levels.update(np.unique(expected).tolist())
        assert tuple(weight.shape) not in float_shapes  # no float copy of a quantized weight
    assert levels == set(range(-8, 8))  # all 16 levels of INT4 in use

    qdq_size = len(onnx_model.SerializeToString())
    float_size = len(export_float(model, (1, 28, 28)).SerializeToString())
    assert qdq_size < 0.17 * float_size
    # the graph around the numbers (names, nodes, attributes) is a sizeable share of a small
    # 4-bit file: terse names, shared zero points, unnamed Q/DQ nodes, no default attributes
    payload = sum(len(t.raw_data) for t in onnx_model.graph.initializer)
    # about 1,100 with verbose names; a 4-bit input's clamp to its grid (see the exporter) costs
    # ~50, the affine grid's zero-point initializer ~30
    assert qdq_size - payload < 880 * len(qmodel.layers)
    zero_points = [n.input[2] for n in onnx_model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(set(zero_points)) == len({numpy_helper.to_array(tensors[z]).item() for z in zero_points}) < len(zero_points)


def test_symmetric_4bit_weights_export_without_zero_points():
    """`weight_grid="symmetric"`: 15 levels around 0, no zero point in the graph, negative
    gammas fold by negating the integers; the graph still computes the fake-quant model."""
    torch.manual_seed(0)
    model = randomize_bn(fashion_resnet())
    pairs = conv_batch_norm_pairs(model)
    for bn in pairs.values():
        with torch.no_grad():
            bn.weight[::3] *= -1
    images = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    qmodel = quantize_model(model, images, 4, 4, weight_grid="symmetric")
    onnx_model = export_qdq(qmodel)
    tensors = initializers(onnx_model)
    dequantized = {node.input[0]: node for node in onnx_model.graph.node if node.op_type == "DequantizeLinear"}
    levels = set()
    for layer in qmodel.layers:
        assert not layer.weight_quant.affine and layer.weight_quant.range() == (-7, 7)
        name, weight = layer.name, qmodel.model.get_submodule(layer.name).weight
        stored = tensors[f"{name}.w_q"]
        expected = layer.weight_quant.quantize(weight).numpy()
        if name in pairs:
            negative = (pairs[name].weight.detach() < 0).numpy()
            expected = np.where(negative.reshape(-1, *[1] * (expected.ndim - 1)), -expected, expected)
        assert stored.data_type == TensorProto.INT4
        np.testing.assert_array_equal(numpy_helper.to_array(stored).astype(np.int8), expected)
        assert len(dequantized[stored.name].input) == 2  # no zero point
        levels.update(np.unique(expected).tolist())
    assert levels == set(range(-7, 8))
    np.testing.assert_allclose(run_onnx(onnx_model, images), torch_logits(fold_batch_norms(qmodel), images),
                               rtol=1e-5, atol=1e-4)


class ConvBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4, eps=1e-3)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x)).flatten(1)


def test_batch_norm_folding_corner_cases(images):
    """Channel 0: negative gamma; 1: running_var 0 (the module's eps counts); 2: all-zero
    weights; 3: gamma 0 (the output is beta alone)."""
    torch.manual_seed(0)
    model = randomize_bn(ConvBatchNorm())
    with torch.no_grad():
        model.bn.weight[0] = -0.7
        model.bn.running_var[1] = 0.0
        model.conv.weight[2] = 0.0
        model.bn.weight[3] = 0.0
    qmodel = quantize_model(model, images, 4, 4)
    folded = fold_batch_norms(qmodel)
    for exported, reference in ((export_qdq(qmodel), folded), (export_float(model, (3, 16, 16)), model)):
        logits = run_onnx(exported, images)
        assert np.isfinite(logits).all()
        np.testing.assert_allclose(logits, torch_logits(reference, images), rtol=1e-5, atol=1e-4)

    tensors = initializers(export_qdq(qmodel))
    integers = numpy_helper.to_array(tensors["conv.w_q"]).astype(np.int8)
    scale = numpy_helper.to_array(tensors["conv.w_scale"])
    layer = qmodel.quant_layer("conv")
    expected = layer.weight_quant.quantize(qmodel.model.conv.weight).numpy()
    zero_point = numpy_helper.to_array(tensors["conv.w_zp"]).astype(np.int8)
    before = layer.weight_quant.zero_point.numpy()
    np.testing.assert_array_equal(integers[0], -1 - expected[0])  # negated on the affine grid
    assert zero_point[0] == -1 - before[0] and zero_point[1] == before[1]
    np.testing.assert_array_equal(integers[1], expected[1])
    assert not integers[2:].any() and not zero_point[2:].any()
    assert (scale > 0).all() and np.isfinite(scale).all()
    # a channel that is its bias alone gets the step that keeps the int32 bias exact
    bias = numpy_helper.to_array(tensors["conv.b_q"]).astype(np.int64)
    assert tensors["conv.b_q"].data_type == TensorProto.INT32
    assert (np.abs(np.abs(bias[2:]) - 2**24) <= 2).all()
    gain = 1 / np.sqrt(1e-3)
    assert scale[1] == pytest.approx(gain * model.bn.weight[1].item() * layer.weight_quant.scale()[1].item())


class Everything(nn.Module):
    """Operations the old hand-written lowering refused, all of which torch exports: GELU, tanh,
    unsqueeze, a ConvTranspose2d, a Conv1d, reading x.shape, split, concat, nearest upsampling,
    ceil-mode pooling, adaptive pooling to 2x2, a dict output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.line = nn.Conv1d(8, 6, 3, padding=1)
        self.pool = nn.AvgPool2d(3, stride=2, ceil_mode=True)
        self.head = nn.Linear(6 * 4, 5)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        y = F.gelu(self.conv(x))
        a, b = torch.split(y, 4, dim=1)
        b = self.up(torch.tanh(b))
        n, c, h, w = a.shape
        y = torch.cat([F.interpolate(a, scale_factor=2, mode="nearest"), b], dim=1)
        y = self.pool(y)
        z = self.line(F.adaptive_avg_pool2d(y, (2, 2)).flatten(2)).unsqueeze(-1)
        return {"out": self.head(z.reshape(n, -1)), "map": y}


@pytest.mark.parametrize("bits", [None, 4, 8])
def test_ops_torch_exports_export_quantized_too(images, bits):
    torch.manual_seed(0)
    model = Everything().eval()
    found = capture(model, images[:1])
    assert [(layer.name, layer.kind) for layer in found.layers] == [
        ("conv", "conv2d"), ("up", "conv_transpose2d"), ("line", "conv1d"), ("head", "linear")]
    assert found.output_names == ("out", "map")
    if bits is None:
        onnx_model, reference = export_float(model, (3, 16, 16)), model
    else:
        reference = fold_batch_norms(quantize_model(model, images, bits, bits))
        onnx_model = export_qdq(reference)
        assert {t.name for t in onnx_model.graph.initializer} >= {"up.w_q", "line.w_q", "head.w_q"}
    assert [o.name for o in onnx_model.graph.output] == ["out", "map"]
    with torch.no_grad():
        expected = reference.forward_all(images) if bits else reference(images)
    from exporters.runtime import inference_session
    session = inference_session(onnx_model, optimize=False)
    got = dict(zip(["out", "map"], session.run(["out", "map"], {"input": images.numpy()})))
    for name in ("out", "map"):
        np.testing.assert_allclose(got[name], expected[name].numpy(), rtol=1e-4, atol=1e-5)


class Spectral(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.blocks = nn.Sequential(SpectralBlock())

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.conv(x)).flatten(1)


class SpectralBlock(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.fft.rfft2(x).abs()


def test_what_torch_cannot_export_is_named_with_module_and_line():
    with pytest.raises(ExportError, match=r"cannot export aten::fft_rfft2 in module 'blocks.0' \(SpectralBlock\) "
                                          r"at .*test_onnx_export.py:\d+: Exporting the operator"):
        export_float(Spectral().eval(), (3, 16, 16))


def test_export_qdq_rejects_float_models_and_old_opsets(export_resnet, quantized, images):
    qmodel = quantized(export_resnet(), images, 4, 4)
    empty = copy.deepcopy(qmodel)
    empty.layers = nn.ModuleList()
    with pytest.raises(ExportError, match="no quantized layer"):
        export_qdq(empty)
    for opset in (17, 99):
        with pytest.raises(ExportError, match=f"opset={opset} is not supported: use 21"):
            export_qdq(qmodel, opset=opset)


def test_model_contract(export_resnet, quantized, images):
    metadata = {"fddaq_version": "0.1.0", "class_names": '["a", "b"]'}
    onnx_model = export_qdq(quantized(export_resnet(), images, 4, 4), metadata=metadata)
    onnx.checker.check_model(onnx_model, full_check=True)
    assert {p.key: p.value for p in onnx_model.metadata_props} == metadata
    assert [(o.domain, o.version) for o in onnx_model.opset_import] == [("", 21)]
    assert onnx_model.ir_version == 10  # the minimum for opset 21, not the newest
    (graph_input,), (graph_output,) = onnx_model.graph.input, onnx_model.graph.output
    assert graph_input.name == "input" and graph_output.name == "logits"
    assert [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim] == ["N", 3, 16, 16]
    assert [d.dim_param or d.dim_value for d in graph_output.type.tensor_type.shape.dim] == ["N", 10]
    assert run_onnx(onnx_model, images[:1]).shape == (1, 10)
    assert run_onnx(onnx_model, images[:5]).shape == (5, 10)


@pytest.mark.parametrize("bits, activations, mixed", [(4, "inputs", False), (8, "all", False), (8, "all", True)])
def test_the_size_model_of_the_bit_search_matches_the_exported_file(bits, activations, mixed):
    """`fddaq.precision.SizeModel` predicts the file the exporter writes from parameter counts
    (the bit search chooses by it): float within 1%, quantized within 2% on the bundled
    MobileNet, with uniform and mixed weight bits."""
    from fddaq.config import QuantConfig
    from fddaq.precision import SizeModel, with_bits
    from fddaq.quant.calibrate import calibrate_min_max
    from fddaq.quant.plan import resolve_layer_plan
    from fddaq.quant.prepare import prepare
    from fddaq.zoo.mobilenet import fashion_mobilenet

    torch.manual_seed(0)
    model = randomize_bn(fashion_mobilenet()).eval()
    x = torch.randn(8, 1, 28, 28)
    found = capture(model, x[:2])
    sizes = SizeModel.of(model, found)
    assert sizes.float_bytes() == pytest.approx(len(export_float(model, (1, 28, 28)).SerializeToString()), rel=0.01)
    plan = resolve_layer_plan(found, QuantConfig(bits, bits, activations=activations))
    if mixed:  # every other layer at 4 bits
        plan = with_bits(plan, {entry.name: 4 for entry in plan.quantized[::2]}, "auto")
    qmodel = prepare(model, found, plan, found.outputs[0].name)
    calibrate_min_max(qmodel, x)
    assert sizes.plan_bytes(plan) == pytest.approx(len(export_qdq(qmodel).SerializeToString()), rel=0.02)
