"""Models that return several tensors: the scored output is picked by --output (default: the
only one, else `out`, else the first), distilled and scored; every output is exported and
verified."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
import torch
from cli_helpers import EXAMPLE, invoke

MODEL = '''
import torch
from torch import nn


class TwoHeads(nn.Module):
    """A dict of class logits ("out"), an auxiliary head ("aux") and a feature map."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.aux = nn.Linear(8, num_classes)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        features = torch.relu(self.bn(self.conv(x)))
        pooled = features.mean((2, 3))
        return {"aux": self.aux(pooled), "out": self.fc(pooled), "features": features}


def build(num_classes=10):
    return TwoHeads(num_classes)
'''


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    (tmp_path / "heads.py").write_text(MODEL)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(MODEL, "heads.py", "exec"), namespace)
    torch.manual_seed(0)
    torch.save(namespace["build"]().state_dict(), tmp_path / "heads.pth")
    for folder in sorted((EXAMPLE / "calib").iterdir()):
        (tmp_path / "calib" / folder.name).mkdir(parents=True)
        for image in sorted(folder.glob("*.png"))[:2]:
            shutil.copy(image, tmp_path / "calib" / folder.name)
    return tmp_path


@pytest.mark.parametrize("choice, scored", [(None, "out"), ("aux", "aux"), ("0", "aux")])
def test_several_outputs_are_exported_verified_and_one_is_scored(workspace, choice, scored):
    args = ["quantize", "heads.pth", "--arch", "heads.py:build", "--preset", "fashion-mnist", "--calib", "calib",
            "--val", "calib", "--steps", "3", "--synthetic", "0", "--quiet", "--out", "out"]
    result = invoke(*args, *(["--output", choice] if choice else []))
    assert result.exit_code == 0, result.output
    report = json.loads((workspace / "out" / "report.json").read_text())
    assert report["model"]["output"] == scored
    assert set(report["verify"]["outputs"]) == {"aux", "out", "features"}
    assert report["verify"]["agreement"] == 100.0
    graph = onnx.load(workspace / "out" / "model.onnx").graph
    assert [o.name for o in graph.output] == ["aux", "out", "features"]
    assert {p.key: p.value for p in onnx.load(workspace / "out" / "model.onnx").metadata_props}["scored_output"] == scored
    result = invoke("eval", "out/model.onnx", "--data", "calib", "--json", "eval.json")  # scores the scored output
    assert result.exit_code == 0, result.output
    top1 = json.loads((workspace / "eval.json").read_text())["accuracy"]["top1"]
    # the scored output's top-1 (measured: out 5%, aux 10% on these images, so the outputs are told apart)
    assert abs(top1 - report["accuracy"]["onnx_top1"]) <= 0.1
