"""What the CLI tests share: the bundled example and a CliRunner."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from cli.main import app

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fashion_mnist"
MODEL_ARGS = [str(EXAMPLE / "model.pth"), "--arch", "fddaq:fashion_resnet"]
BASE = ["quantize", *MODEL_ARGS, "--calib", str(EXAMPLE / "calib"), "--quiet"]

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))
