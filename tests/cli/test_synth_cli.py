import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from fddaq.evaluate import predict
from fddaq.pipeline import Source, load_inputs

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fashion_mnist"
runner = CliRunner()


def test_synth_writes_labelled_images_preview_and_curves(tmp_path):
    result = runner.invoke(app, [
        "synth", str(EXAMPLE / "model.pth"), "--arch", "fddaq:fashion_resnet",
        "--calib", str(EXAMPLE / "calib"), "--val", str(EXAMPLE / "val"),
        "--num", "30", "--steps", "4", "--out", str(tmp_path), "--quiet",
    ])
    assert result.exit_code == 0, result.output
    data = torch.load(tmp_path / "synthetic.pt", weights_only=True)
    assert data["images"].shape == (30, 1, 28, 28) and data["images"].dtype == torch.float32
    assert data["labels"].dtype == torch.int64 and sorted(set(data["labels"].tolist())) == list(range(10))
    assert Image.open(tmp_path / "preview.png").size[1] == 10 * 30 - 2  # one row per class
    report = json.loads((tmp_path / "report.json").read_text())
    synthesis = report["synthesis"]
    assert synthesis["num_bn_layers"] == 9 and synthesis["deep_start"] == 3
    inputs = load_inputs(Source(EXAMPLE / "model.pth", "fddaq:fashion_resnet", EXAMPLE / "calib"))
    wrong = predict(inputs.teacher, inputs.calib.images).argmax(1) != inputs.calib.labels
    assert synthesis["misclassified_excluded"] == int(wrong.sum()) > 0
    assert synthesis["classes_with_center"] == len(set(inputs.calib.labels[~wrong].tolist()))
    assert len(synthesis["curves"]["dbns"]) == 4
    assert set(synthesis["quality"]) == {"synthetic", "real_val"}
    assert report["config"]["noise_var_std"] == 1.0


def test_synth_refuses_to_overwrite_and_partial_class_folders(tmp_path):
    (tmp_path / "report.json").write_text("{}")
    base = ["synth", str(EXAMPLE / "model.pth"), "--arch", "fddaq:fashion_resnet", "--steps", "1"]
    result = runner.invoke(app, [*base, "--calib", str(EXAMPLE / "calib"), "--out", str(tmp_path)])
    assert result.exit_code == 1 and "--force" in result.output
    partial = tmp_path / "partial"
    (partial / "7_sneaker").mkdir(parents=True)
    for png in sorted((EXAMPLE / "calib" / "7_sneaker").glob("*.png"))[:2]:
        (partial / "7_sneaker" / png.name).write_bytes(png.read_bytes())
    result = runner.invoke(app, [*base, "--calib", str(partial), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "--classes FILE" in result.output
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(p.name for p in sorted((EXAMPLE / "calib").iterdir())))
    result = runner.invoke(app, [*base, "--calib", str(partial), "--classes", str(classes),
                                 "--num", "10", "--out", str(tmp_path / "o"), "--quiet"])
    assert result.exit_code == 0, result.output
    inputs = load_inputs(Source(EXAMPLE / "model.pth", "fddaq:fashion_resnet", partial, classes_file=classes))
    right = predict(inputs.teacher, inputs.calib.images).argmax(1) == inputs.calib.labels
    expected = len(set(inputs.calib.labels[right].tolist()))  # the sneaker class, when a sneaker is recognised
    assert json.loads((tmp_path / "o" / "report.json").read_text())["synthesis"]["classes_with_center"] == expected


def test_synth_method_pool_and_an_unknown_method(tmp_path):
    base = ["synth", str(EXAMPLE / "model.pth"), "--arch", "fddaq:fashion_resnet", "--calib", str(EXAMPLE / "calib"),
            "--num", "20", "--steps", "3", "--quiet"]
    result = runner.invoke(app, [*base, "--method", "pool", "--out", str(tmp_path / "pool")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "pool" / "report.json").read_text())
    assert report["config"]["method"] == report["synthesis"]["method"] == "pool" and len(report["synthesis"]["curves"]["cbns"]) == 3
    labels = torch.load(tmp_path / "pool" / "synthetic.pt", weights_only=True)["labels"]
    assert sorted(labels.tolist()) == sorted(list(range(10)) * 2)
    result = runner.invoke(app, [*base, "--method", "diffusion", "--out", str(tmp_path / "bad")])
    said = " ".join(result.output.replace("│", " ").split())  # Typer's error box wraps lines
    assert result.exit_code == 2 and "'diffusion' is not one of 'pool', 'generator'" in said
    assert "Traceback" not in result.output and not (tmp_path / "bad").exists()


def test_data_free_synth_runs_without_calibration_images_and_other_recipes_ask_for_them(tmp_path):
    base = ["synth", str(EXAMPLE / "model.pth"), "--arch", "fddaq:fashion_resnet", "--num", "20", "--steps", "2", "--quiet"]
    result = runner.invoke(app, [*base, "--recipe", "data-free", "--out", str(tmp_path / "free")])
    assert result.exit_code == 0, result.output
    strict = lambda constant: pytest.fail(f"report.json holds {constant}")
    report = json.loads((tmp_path / "free" / "report.json").read_text(), parse_constant=strict)
    assert report["config"]["method"] == "generator" and report["config"]["real_images"] is False
    assert report["data"]["calib_images"] == 0 and report["synthesis"]["classes_with_center"] == 0
    assert report["synthesis"]["quality"]["synthetic"]["separation"] is None  # nothing to measure against
    assert report["synthesis"]["quality"]["synthetic"]["diversity"] is None
    labels = torch.load(tmp_path / "free" / "synthetic.pt", weights_only=True)["labels"]
    assert sorted(set(labels.tolist())) == list(range(10))
    result = runner.invoke(app, [*base, "--recipe", "fddaq", "--out", str(tmp_path / "fddaq")])
    assert result.exit_code == 1 and "give --calib DIR" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, [*base, "--recipe", "ptq", "--out", str(tmp_path / "ptq")])  # a usage error: the choices
    said = " ".join(result.output.replace("│", " ").split())  # Typer's error box wraps lines
    assert result.exit_code == 2 and "'ptq' is not one of 'fddaq', 'fdda-paper', 'data-free'" in said
