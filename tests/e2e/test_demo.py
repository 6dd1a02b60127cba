"""The README's demo on the bundled example, with the default recipe and budget."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fashion_mnist"


@pytest.mark.slow
def test_demo_w4a4_all_layers_keeps_accuracy(tmp_path):
    result = CliRunner().invoke(app, [
        "quantize", str(EXAMPLE / "model.pth"), "--arch", "fddaq:fashion_resnet",
        "--calib", str(EXAMPLE / "calib"), "--val", str(EXAMPLE / "val"),
        "--bits", "4", "--out", str(tmp_path), "--quiet", "--max-drop", "2",
    ])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    acc = report["accuracy"]
    assert acc["float_top1"] - acc["onnx_top1"] <= 2.0  # regression guard: measured 0.55 (92.85 -> 92.30, 2026-11-30)
    assert acc["onnx_vs_fake_quant_agreement"] >= 99.5
    # the default: block reconstruction on the real images alone, every unit of the ResNet
    assert report["config"]["recipe"] == "reconstruct" and report["synthesis"] is None
    assert not (tmp_path / "preview.png").exists()
    rebuilt = report["reconstruct"]
    assert rebuilt["units"] == 5 and rebuilt["layers"] == rebuilt["rounded_layers"] == 10
    assert rebuilt["loss_after"] < rebuilt["loss_before"]
    assert set(rebuilt["unit_batches"].values()) == {32}  # 28 x 28 units: every batch whole
    assert report["finetune"]["steps"] == 0 and report["config"]["reconstruct"]["iterations"] == 500
    assert "reconstruction: 5 units, 10 layers" in result.output
