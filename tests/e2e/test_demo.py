"""The README's demo on the bundled example, with its default fine-tuning budget."""

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
    acc = json.loads((tmp_path / "report.json").read_text())["accuracy"]
    assert acc["float_top1"] - acc["onnx_top1"] <= 2.0
    assert acc["onnx_vs_fake_quant_agreement"] >= 99.5
