"""`fddaq quantize` under torchrun with 2 CPU processes (gloo) against one process: the
fine-tuning recipe, whose batches the processes share."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import EXAMPLE, MODEL_ARGS

OPTIONS = [*MODEL_ARGS, "--calib", str(EXAMPLE / "calib"), "--val", str(EXAMPLE / "val"), "--bits", "4",
           "--recipe", "fddaq", "--steps", "60", "--synth-steps", "40", "--synthetic", "128", "--device", "cpu"]


def run(command: list[str], out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*command, "quantize", *OPTIONS, "--out", str(out)], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.mark.slow
def test_two_processes_match_one_and_write_once(tmp_path):
    fddaq = shutil.which("fddaq", path=str(Path(sys.executable).parent))
    single = run([fddaq], tmp_path / "one")
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", fddaq]
    double = run(torchrun, tmp_path / "two")
    assert double.returncode == 0, double.stderr[-3000:]
    assert double.stdout.count("fddaq quantize:") == 1  # rank 0 reports, rank 1 is silent
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    one, two = (json.loads((tmp_path / name / "report.json").read_text()) for name in ("one", "two"))
    assert (one["processes"], two["processes"]) == (1, 2)
    # the same steps over the same held-out split (the processes share each global batch)
    assert one["finetune"]["steps"] == two["finetune"]["steps"] == 60
    assert one["finetune"]["holdout_images"] == two["finetune"]["holdout_images"] > 0
    # different random batches, the same recipe: the accuracy holds (2,000 val images)
    assert abs(one["accuracy"]["onnx_top1"] - two["accuracy"]["onnx_top1"]) < 1.0
    assert two["accuracy"]["onnx_vs_fake_quant_agreement"] > 99.0
