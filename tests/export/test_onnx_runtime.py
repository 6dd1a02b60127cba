"""onnxruntime execution and verification of exported graphs."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
import torch

from exporters import VerifyReport, export_qdq, run_onnx, verify
from exporters.onnx_export import layer_input
from fddaq.errors import ExportError
from fddaq.quant.fold import fold_batch_norms


@pytest.fixture
def exported(export_resnet, quantized, images):
    qmodel = quantized(export_resnet(), images, 4, 4)
    return export_qdq(qmodel), qmodel


def test_run_onnx_accepts_every_model_source_and_batches(exported, images, tmp_path):
    onnx_model, _ = exported
    path = tmp_path / "model.onnx"
    onnx.save(onnx_model, path)
    reference = run_onnx(onnx_model, images)
    assert reference.shape == (64, 10) and reference.dtype == np.float32
    for source in (onnx_model.SerializeToString(), path, str(path)):
        np.testing.assert_array_equal(run_onnx(source, images.numpy()), reference)
    # the convolution kernel depends on the batch size: equal up to float rounding
    np.testing.assert_allclose(run_onnx(onnx_model, images, batch_size=7), reference, rtol=0, atol=1e-6)


def test_run_onnx_reports_unloadable_models(tmp_path):
    with pytest.raises(ExportError, match="onnxruntime cannot load the model"):
        run_onnx(tmp_path / "missing.onnx", np.zeros((1, 3, 16, 16), np.float32))


def test_missing_onnxruntime_is_a_clear_error(exported, images, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(ExportError, match=r"onnxruntime is not installed: pip install 'fddaq\[cpu\]'"):
        run_onnx(exported[0], images)


def test_verify_reports_agreement_and_accuracy(exported, images):
    onnx_model, qmodel = exported
    with torch.no_grad():
        labels = qmodel(images).argmax(1)
    labels[:16] = (labels[:16] + 1) % 10  # 25% wrong on purpose
    report = verify(onnx_model, qmodel, images, labels, batch_size=20)
    assert isinstance(report, VerifyReport)
    assert report.samples == 64
    assert report.agreement == report.optimized_agreement == 100.0
    assert report.torch_top1 == report.onnx_top1 == 75.0
    assert report.max_abs_diff < 1e-6 and 0 <= report.mean_abs_diff <= report.max_abs_diff
    assert report.max_step_diff < 1e-3 and report.optimized_max_step_diff < 1e-3
    assert report.onnx_top1 == report.optimized_top1 == 75.0
    # the 4 quantized layer inputs (stem, conv1, conv2 and shortcut share one; fc) per image
    assert report.activation_values > 64 * 3 * 16 * 16 and report.activation_mismatches == 0
    assert report.local_mismatches == report.local_max_step_diff == 0
    assert report.float_ops.get("Conv", 0) >= 1  # 4-bit convolutions run in float
    assert set(report.to_json()) == {
        "samples", "agreement", "max_abs_diff", "mean_abs_diff", "max_step_diff", "mean_step_diff",
        "activation_values", "activation_mismatches", "activation_max_step_diff", "local_mismatches",
        "local_max_step_diff", "local_agreement", "onnx_top1", "torch_top1",
        "optimized_agreement", "optimized_max_abs_diff", "optimized_max_step_diff", "optimized_top1",
        "integer_ops", "float_ops", "outputs",
    }
    with torch.no_grad():
        logits = fold_batch_norms(qmodel)(images)
    top2 = logits.topk(2, dim=1).values
    near = 100.0 * (top2[:, 0] - top2[:, 1] < 0.01 * (logits.max() - logits.min())).float().mean().item()
    assert report.outputs == {"logits": {"agreement": 100.0, "max_abs_diff": report.max_abs_diff, "near_ties": near,
                                         "optimized_agreement": 100.0,
                                         "optimized_max_abs_diff": report.optimized_max_abs_diff}}
    assert verify(onnx_model, qmodel, images[:8]).torch_top1 is None


def test_verify_batches_to_its_activation_budget(exported, images, monkeypatch):
    """By default a batch holds as many images as keep the compared activations within the
    budget (a 240-px EfficientNet once held every activation of 176 images: 22 GiB)."""
    import exporters.runtime as runtime

    onnx_model, qmodel = exported
    whole = verify(onnx_model, qmodel, images[:12])
    sizes = []
    batches = runtime._batches
    monkeypatch.setattr(runtime, "_batches", lambda session, x, size, *rest: sizes.append(size) or batches(session, x, size, *rest))
    per_image = 3 * 4 * 3 * 16 * 16  # at least the stem's input, three times
    monkeypatch.setattr(runtime, "ACTIVATION_BUDGET", 5 * per_image)
    small = verify(onnx_model, qmodel, images[:12])
    assert 1 <= sizes[0] < 5 and sizes[0] == sizes[-1]
    assert small.activation_values == whole.activation_values and small.activation_mismatches == 0
    assert small.agreement == whole.agreement == 100.0 and small.max_abs_diff < 1e-6


def test_verify_rejects_bad_inputs(exported, images):
    onnx_model, qmodel = exported
    with pytest.raises(ExportError, match="3 labels for 64 images"):
        verify(onnx_model, qmodel, images, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ExportError, match="at least one image"):
        verify(onnx_model, qmodel, images[:0])


def shift_zero_point(onnx_model: onnx.ModelProto, layer: str) -> onnx.ModelProto:
    """A copy whose DequantizeLinear of `layer`'s input is one step off."""
    shifted = onnx.ModelProto()
    shifted.CopyFrom(onnx_model)
    node = next(n for n in shifted.graph.node if n.output[0] == layer_input(layer))
    zero_point = next(t for t in shifted.graph.initializer if t.name == node.input[2])
    value = onnx.numpy_helper.to_array(zero_point)
    shifted.graph.initializer.append(
        onnx.numpy_helper.from_array((value.astype(np.int64) + 1).astype(value.dtype), f"{layer}_shifted_zero_point")
    )
    node.input[2] = f"{layer}_shifted_zero_point"
    return shifted


def test_verify_counts_activation_mismatches_in_steps(exported, images):
    """A graph whose first DequantizeLinear is one step off: every value of that input differs
    by one step. Running freely, the later layers differ too; fed the graph's values, PyTorch
    reproduces the later layers, and the local count is exactly the first input's values. The
    last layer's input one step off moves the logits by whole output steps."""
    onnx_model, qmodel = exported
    report = verify(shift_zero_point(onnx_model, "stem.0"), qmodel, images[:8])
    assert report.local_mismatches == 8 * 3 * 16 * 16 and report.local_max_step_diff == 1
    assert report.activation_mismatches > report.local_mismatches and report.activation_max_step_diff >= 1
    report = verify(shift_zero_point(onnx_model, "fc"), qmodel, images[:8])
    assert report.local_mismatches == 8 * 16 and report.max_step_diff >= 1


def test_verify_rejects_a_graph_of_another_model(exported, images, export_resnet, quantized):
    onnx_model, _ = exported
    other = export_resnet()
    other.fc = torch.nn.Linear(16, 3)
    other = quantized(other, images, 8, 8)
    with pytest.raises(ExportError, match=r"output 'logits' has shape \(10,\) where the PyTorch model's has \(3,\)"):
        verify(onnx_model, other, images[:4])


def test_verify_leaves_the_torch_model_alone(exported, images):
    """verify folds, moves and taps a copy: the caller's model keeps its mode, output, form and values."""
    onnx_model, qmodel = exported
    qmodel.train()
    before = {key: value.clone() for key, value in qmodel.state_dict().items()}
    output, deployed = qmodel.output, qmodel.deployed
    verify(onnx_model, qmodel, images[:4])
    assert qmodel.training and qmodel.output == output and qmodel.deployed == deployed and qmodel.tap is None
    after = qmodel.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())



def test_verify_compares_outputs_alone_in_a_graph_without_the_layers_tensors(exported, images):
    """A graph whose tensors between operators carry other names (another exporter, an
    optimizer that renamed them) has none of the per-layer tensors verify compares: the
    activation comparison is then empty, and the outputs are still compared in full."""
    onnx_model, qmodel = exported
    renamed = onnx.ModelProto()
    renamed.CopyFrom(onnx_model)
    outputs = {output.name for output in renamed.graph.output}
    names = {value for node in renamed.graph.node for value in node.output if value not in outputs}
    for node in renamed.graph.node:
        node.input[:] = [f"other/{value}" if value in names else value for value in node.input]
        node.output[:] = [f"other/{value}" if value in names else value for value in node.output]
    full, bare = verify(onnx_model, qmodel, images[:16]), verify(renamed, qmodel, images[:16])
    assert full.activation_values > 0 and bare.activation_values == 0 and bare.activation_mismatches == 0
    assert bare.agreement == full.agreement == 100.0 and bare.max_abs_diff == full.max_abs_diff
    assert bare.local_agreement == 100.0  # fed nothing: the free-running model, which agrees


def test_agreement_takes_rounding_ties_and_single_values_as_they_are():
    """A class tied with the top one to float32 rounding agrees (the summation order breaks such
    a tie either way); a margin of 1e-3 does not; an output of one value per image is compared
    by sign (it agreed always before: the arg max of one class). Near ties are counted from the
    reference's top-2 margin against 1% of the output's spread."""
    from exporters.runtime import _agreement, _near_ties

    reference = np.array([[1.0, 1.0 + 2**-22, -3.0], [0.5, 0.2, 0.1]], np.float32)
    graph = np.array([[1.0 + 2**-22, 1.0, -3.0], [0.5, 0.2, 0.1]], np.float32)
    assert _agreement(graph, reference) == 100.0
    reference[0, 1] = 1.001
    assert _agreement(graph, reference) == 50.0
    assert _near_ties(reference) == 50.0  # margin 1e-3 < 0.04 (1% of 4.0); 0.3 is not
    single = np.array([[0.3], [-0.2]], np.float32)
    assert _agreement(np.array([[0.1], [0.4]], np.float32), single) == 50.0
    assert _agreement(np.array([0.1, 0.4], np.float32), single[:, 0]) == 50.0  # [N] as [N, 1]
    assert _near_ties(single) == 0.0 and _near_ties(np.array([[0.3], [-0.001]], np.float32)) == 50.0
    # the tolerance is that of the two logits compared, not of a very negative (masked) class
    masked = np.array([[200.0, 100.0, -1e9], [5.0, 1.0, -np.inf]], np.float32)
    assert _agreement(np.array([[100.0, 200.0, -1e9], [1.0, 5.0, -np.inf]], np.float32), masked) == 0.0
    assert _agreement(masked, masked) == 100.0
    assert _agreement(np.full((2, 3), np.nan, np.float32), masked) == 0.0  # a NaN output never agrees
    # a map [N, classes, H, W]: per pixel
    reference = np.full((1, 2, 2, 2), 0.5, np.float32)  # class 1 at 0.5 everywhere
    reference[0, 0] = [[0.505, 1.0], [0.0, 0.0]]  # class 0 wins the top row, by a near tie on the left
    graph = reference.copy()
    graph[0, 0, 1, 1] = 1.0  # one pixel of four takes the other class
    assert _agreement(graph, reference) == 75.0 and _near_ties(reference) == 25.0
