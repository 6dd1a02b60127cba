"""Models that cannot be exported or quantized are refused before any work: `plan`, `quantize`
and `synth` capture the model and dry-run the export first, and say what fails (the operation,
the module, the source line) in one line, exit 1, write nothing, in seconds."""

from __future__ import annotations

import json
import re
import shutil
import time

import pytest
import torch
from cli_helpers import EXAMPLE, invoke

MODELS = '''
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    """conv -> BN -> ReLU -> `body` -> pooled logits."""

    def __init__(self, body, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.body = body
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.body(F.relu(self.bn(self.conv(x))))
        return self.fc(x.mean((2, 3)))


class Spectral(nn.Module):
    def forward(self, x):
        return torch.fft.rfft2(x, s=x.shape[-2:]).abs()  # SPECTRAL


class Gate(nn.Module):
    def forward(self, x):
        if x.mean() > 0:  # GATE
            return x
        return -x


class OneImage(nn.Module):
    def forward(self, x):
        return x.view(1, 8, x.shape[2], x.shape[3])  # ONE_IMAGE


class BatchBranch(nn.Module):
    def forward(self, x):
        return x * 2 if x.shape[0] == 1 else x  # BATCH_BRANCH


class Dense(nn.Module):
    """A segmentation map: classes at every pixel."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 10, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def spectral():
    return Net(Spectral())


def gate():
    return Net(Gate())


def one_image():
    return Net(OneImage())


def batch_branch():
    return Net(BatchBranch())


def dense():
    return Dense()
'''


def line_of(marker: str) -> int:
    return next(i for i, line in enumerate(MODELS.splitlines(), 1) if line.rstrip().endswith(f"# {marker}"))


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """The models file, a random state dict per model, a 10-class calibration folder; the
    current folder is the workspace (the spec names ./models.py)."""
    (tmp_path / "models.py").write_text(MODELS)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(MODELS, str(tmp_path / "models.py"), "exec"), namespace)
    for name in ("spectral", "gate", "one_image", "batch_branch", "dense"):
        torch.manual_seed(0)
        torch.save(namespace[name]().state_dict(), tmp_path / f"{name}.pth")
    for folder in sorted((EXAMPLE / "calib").iterdir()):
        (tmp_path / "calib" / folder.name).mkdir(parents=True)
        shutil.copy(next(folder.glob("*.png")), tmp_path / "calib" / folder.name)
    return tmp_path


def run(command: str, name: str, *extra: str):
    args = [command, f"{name}.pth", "--arch", f"./models.py:{name}", "--preset", "fashion-mnist"]
    if command != "plan":
        args += ["--calib", "calib", "--out", "out", "--quiet"]
    start = time.perf_counter()
    result = invoke(*args, *extra)
    return result, time.perf_counter() - start


CASES = [
    ("spectral", rf"cannot export aten::fft_rfft2 in module 'body' \(Spectral\) at models.py:{line_of('SPECTRAL')}: "
                 r"Exporting the operator 'aten::fft_rfft2' to ONNX opset version 20 is not supported"),
    ("gate", rf"cannot export: module 'body' \(Gate\) at models.py:{line_of('GATE')} converts a tensor computed from "
             r"the input to a Python value \(Tensor.__bool__"),
    ("one_image", rf"the model fails on an input of shape \(2, 1, 28, 28\) in module 'body' \(OneImage\) at "
                  rf"models.py:{line_of('ONE_IMAGE')}: shape '\[1, 8, 28, 28\]' is invalid"),
    ("batch_branch", r"the exported graph computes output 'logits' differently from the model on new inputs"),
]


@pytest.mark.parametrize("command", ["plan", "quantize", "synth"])
@pytest.mark.parametrize("name, message", CASES)
def test_unexportable_models_are_refused_before_any_work(workspace, command, name, message):
    result, seconds = run(command, name)
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and "Traceback" not in result.output
    assert result.output.strip().count("\n") == 0, result.output
    assert re.search(message, result.output), result.output
    assert not (workspace / "out").exists()  # nothing written, no resume state
    assert seconds < 30  # nothing trained: a tiny model fails in a second or two


def test_a_segmentation_map_is_refused_by_distilling_recipes_only(workspace):
    for distilling in (("--recipe", "fddaq"), ("--synthetic", "16")):
        result, _ = run("quantize", "dense", *distilling)
        assert result.exit_code == 1 and "the scored output 'logits' has shape (10, 28, 28)" in result.output
        assert "use --recipe reconstruct (without --synthetic) or ptq" in result.output
        assert not (workspace / "out").exists()
    result, _ = run("synth", "dense")
    assert result.exit_code == 1 and "distil class logits [N, classes]; give --output" in result.output
    # the default reconstructs each unit's output: a map is as good a target as logits
    result, _ = run("quantize", "dense", "--bits", "8", "--steps", "5")
    assert result.exit_code == 0, result.output
    assert (workspace / "out" / "model.onnx").exists()
    assert json.loads((workspace / "out" / "report.json").read_text())["reconstruct"]["units"] >= 1
    result, _ = run("quantize", "dense", "--recipe", "ptq", "--bits", "8", "--force")
    assert result.exit_code == 0, result.output


def test_plan_lists_outputs_and_checks_the_export(workspace):
    result, _ = run("plan", "dense")
    assert result.exit_code == 0, result.output
    assert "outputs: logits [10, 28, 28] (scored: logits); export dry run passed" in " ".join(result.output.split())
    result, _ = run("plan", "dense", "--output", "aux")
    assert result.exit_code == 1 and "--output 'aux' is not an output of the model; its outputs: logits" in result.output
