"""`plan`, `eval`, per-layer overrides and `--config` files."""

import json
import shutil

import pytest
from cli_helpers import BASE, EXAMPLE, MODEL_ARGS, invoke


def test_plan_lists_every_layer_with_overrides(tmp_path):
    result = invoke("plan", *MODEL_ARGS, "--bits", "4", "--layer-bits", "fc=8",
                    "--layer-bits", "stages.*.shortcut.*=float", "--json", str(tmp_path / "plan.json"))
    assert result.exit_code == 0, result.output
    plan = {entry["name"]: entry for entry in json.loads((tmp_path / "plan.json").read_text())["plan"]}
    assert (plan["fc"]["weight_bits"], plan["fc"]["act_bits"], plan["fc"]["reason"]) == (8, 8, "override fc=8")
    assert plan["stem.0"]["act_bits"] == 8 and plan["stages.0.0.conv1"]["weight_bits"] == 4
    shortcuts = [name for name in plan if ".shortcut." in name]
    assert len(shortcuts) == 2 and all(plan[name]["kind"] == "float" for name in shortcuts)
    assert "8 layers quantized, 2 kept float" in result.output
    assert "stages.1.0.shortcut.0" in result.output
    # piped (80 columns here) each row is one line, nothing cut: every reason is there in full
    assert all(entry["reason"] in result.output for entry in plan.values())
    assert plan["stages.0.0.conv1"]["weight_grid"] == "affine" and plan["fc"]["weight_grid"] == "symmetric"
    result = invoke("plan", *MODEL_ARGS, "--bits", "4", "--weight-grid", "symmetric", "--json", str(tmp_path / "sym.json"))
    assert result.exit_code == 0, result.output
    assert {entry["weight_grid"] for entry in json.loads((tmp_path / "sym.json").read_text())["plan"]} == {"symmetric"}
    assert "activations: the inputs of the layers" in result.output  # auto at 4 bits
    result = invoke("plan", *MODEL_ARGS, "--bits", "4", "--activations", "all", "--json", str(tmp_path / "all.json"))
    assert result.exit_code == 0, result.output
    tensors = json.loads((tmp_path / "all.json").read_text())["tensors"]
    assert "activations: every tensor between operators" in result.output and f"{len(tensors)} tensors" in result.output
    assert tensors["stem.2:relu"] == 4 and set(tensors.values()) == {4}


@pytest.mark.parametrize(
    "args, message",
    [
        (("--layer-bits", "head=8"), "layer override 'head=8' matches no layer; layers: stem.0, stages.0.0.conv1"),
        (("--layer-bits", "fc=9"), "layer override 'fc=9': 9 bits is outside the supported 2..8"),
        (("--layer-bits", "fc"), "layer override 'fc' must be PATTERN=BITS"),
        (("--bits", "1"), "weight_bits=1 is outside the supported 2..8 bits"),
    ],
)
def test_plan_errors(args, message):
    result = invoke("plan", *MODEL_ARGS, *args)
    assert result.exit_code == 1 and result.output.startswith("Error: ") and message in result.output


@pytest.mark.parametrize("flag, value, choices", [
    ("--weight-grid", "asymmetric", "'auto', 'symmetric'"),
    ("--activations", "outputs", "'auto', 'all', 'inputs'"),
    ("--preset", "cifar", "'fashion-mnist', 'imagenet', 'efficientnet-lite'"),
])
def test_a_choice_outside_its_list_is_a_usage_error_naming_the_choices(flag, value, choices):
    result = invoke("plan", *MODEL_ARGS, flag, value)
    said = " ".join(result.output.replace("│", " ").split())  # Typer's error box wraps lines
    assert result.exit_code == 2 and f"'{value}' is not one of {choices}" in said, result.output


def test_quantize_honours_layer_overrides(tmp_path):
    result = invoke(*BASE, "--steps", "0", "--layer-bits", "fc=float", "--layer-bits", "stem.*=8/8",
                    "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    plan = {e["name"]: e for e in json.loads((tmp_path / "report.json").read_text())["plan"]}
    assert plan["fc"]["kind"] == "float" and (plan["stem.0"]["weight_bits"], plan["stem.0"]["act_bits"]) == (8, 8)


def test_eval_measures_float_checkpoint_and_onnx(quick_run, tmp_path):
    out, _ = quick_run
    report = json.loads((out / "report.json").read_text())["accuracy"]
    val = str(EXAMPLE / "val")
    results = {}
    for name, args in {
        "float": MODEL_ARGS, "checkpoint": [str(out / "quantized.pt")], "onnx": [str(out / "model.onnx")],
    }.items():
        result = invoke("eval", *args, "--data", val, "--json", str(tmp_path / f"{name}.json"))
        assert result.exit_code == 0, result.output
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
        assert results[name]["kind"] == name and results[name]["data"]["images"] == 2000
    assert results["float"]["accuracy"]["top1"] == pytest.approx(report["float_top1"])
    assert results["checkpoint"]["accuracy"]["top1"] == pytest.approx(report["fake_quant_top1"])
    assert abs(results["onnx"]["accuracy"]["top1"] - report["onnx_top1"]) <= 0.1  # optimized graph
    # top-5 holds every top-1 hit and more (a model at about 92% top-1 misses some of its second guesses)
    assert results["onnx"]["accuracy"]["top1"] < results["onnx"]["accuracy"]["top5"] <= 100


def test_eval_errors(quick_run, tmp_path):
    out, _ = quick_run
    flat = tmp_path / "flat"
    flat.mkdir()
    first = next((EXAMPLE / "calib").glob("*/*.png"))
    (flat / first.name).write_bytes(first.read_bytes())
    cases = [
        (["eval", str(out / "model.onnx"), "--data", str(flat)], "must hold one folder per class"),
        (["eval", *MODEL_ARGS, "--data", str(flat)], "must hold one folder per class"),  # not its own predictions
        (["eval", str(out / "model.onnx"), "--arch", "fddaq:fashion_resnet", "--data", str(flat)], "--arch is for a float state dict"),
        (["eval", str(out / "quantized.pt"), "--preset", "imagenet", "--data", str(flat)], "a checkpoint or ONNX file carries its own"),
        (["eval", str(EXAMPLE / "model.pth"), "--data", str(flat)], "is not an fddaq checkpoint"),
        (["eval", str(tmp_path / "none.onnx"), "--data", str(flat)], "does not exist"),
    ]
    for args, message in cases:
        result = invoke(*args)
        assert result.exit_code == 1 and message in result.output, (args, result.output)
        assert "Traceback" not in result.output


def test_config_file_values_are_defaults_that_flags_override(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(
        f'model = "{EXAMPLE / "model.pth"}"\narch = "fddaq:fashion_resnet"\ncalib = "{EXAMPLE / "calib"}"\n'
        f'quiet = true\n\n[quantize]\nbits = 2\nsteps = 0\nlayer-bits = ["fc=8"]\nout = "{tmp_path / "a"}"\n'
    )
    result = invoke("quantize", "--config", str(config), "--bits", "3")
    assert result.exit_code == 0, result.output
    first = json.loads((tmp_path / "a" / "report.json").read_text())
    assert first["config"]["quant"]["weight_bits"] == 3 and first["config"]["finetune"]["steps"] == 0
    assert first["config"]["quant"]["layers"] == ["fc=8"]

    saved = (tmp_path / "a" / "config.toml").read_text()  # the resolved options, flags included
    assert "bits = 3" in saved and 'layer-bits = ["fc=8"]' in saved and "quiet" not in saved
    result = invoke("quantize", "--config", str(tmp_path / "a" / "config.toml"), "--out", str(tmp_path / "b"), "--quiet")
    assert result.exit_code == 0, result.output
    second = json.loads((tmp_path / "b" / "report.json").read_text())
    assert second["config"] == first["config"] and second["plan"] == first["plan"]
    assert second["accuracy"] == first["accuracy"]


def test_a_saved_config_repeats_the_run_from_another_folder(tmp_path, monkeypatch):
    """config.toml stored paths as given (relative to where the run started), so
    `--config out/config.toml` failed from any other folder. They are stored absolute, and a
    relative path written in a config file is read relative to that file."""
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    shutil.copytree(EXAMPLE / "calib", work / "data" / "calib")
    shutil.copy(EXAMPLE / "model.pth", work / "model.pth")
    monkeypatch.chdir(work)
    result = invoke("quantize", "model.pth", "--arch", "fddaq:fashion_resnet", "--calib", "data/calib", "--steps", "0",
                    "--out", "a", "--quiet")
    assert result.exit_code == 0, result.output
    saved = (work / "a" / "config.toml").read_text()
    assert f'calib = "{work / "data" / "calib"}"' in saved and f'model = "{work / "model.pth"}"' in saved
    monkeypatch.chdir(tmp_path)
    result = invoke("quantize", "--config", "work/a/config.toml", "--out", "b", "--quiet")
    assert result.exit_code == 0, result.output
    (work / "by_hand.toml").write_text('model = "model.pth"\narch = "fddaq:fashion_resnet"\ncalib = "data/calib"\n'
                                       'steps = 0\nout = "c"\n')
    result = invoke("quantize", "--config", "work/by_hand.toml", "--quiet")
    assert result.exit_code == 0, result.output
    assert (work / "c" / "report.json").is_file()


@pytest.mark.parametrize(
    "text, message",
    [
        ("bitz = 4\n", "'bitz' is not an option of `fddaq quantize`"),
        ("bits = [\n", "is not valid TOML"),
        ("quantize = 3\n", "[quantize] must be a table of options"),
    ],
)
def test_bad_config_files(tmp_path, text, message):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    result = invoke(*BASE, "--config", str(config), "--out", str(tmp_path / "o"))
    assert result.exit_code == 1 and result.output.startswith("Error: ") and message in result.output
    assert not (tmp_path / "o").exists()
    result = invoke(*BASE, "--config", str(tmp_path / "missing.toml"))
    assert result.exit_code == 1 and "does not exist" in result.output


def test_a_pickled_whole_model_needs_trust_model(tmp_path):
    import torch

    from fddaq.models import load_float_model

    model = load_float_model(EXAMPLE / "model.pth", "fddaq:fashion_resnet")
    torch.save(model, tmp_path / "whole.pt")  # pickles the class: loading runs code
    args = ["plan", str(tmp_path / "whole.pt"), "--arch", "fddaq:fashion_resnet", "--json", str(tmp_path / "p.json")]
    result = invoke(*args)
    assert result.exit_code == 1 and "pass --trust-model if you trust the file" in result.output
    assert not (tmp_path / "p.json").exists()
    result = invoke(*args, "--trust-model")
    assert result.exit_code == 0, result.output
    assert len(json.loads((tmp_path / "p.json").read_text())["plan"]) == 10


def test_summary_markdown_is_written_and_appended_to_the_github_step_summary(quick_run, tmp_path, monkeypatch):
    out, _ = quick_run
    summary = (out / "summary.md").read_text()
    assert summary.startswith("### fddaq quantize: model.pth at W4A4, recipe reconstruct")
    assert "| ONNX top-1 (val) |" in summary and "| stem.0 | conv2d | 4 | 8 |" in summary
    report = json.loads((out / "report.json").read_text())
    sqnr = [layer["sqnr_db"] for layer in report["layers"]]
    assert len(sqnr) == 10 and all(5 < value < 60 for value in sqnr)  # dB; 4-bit errors accumulate
    step_summary = tmp_path / "step_summary.md"
    step_summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step_summary))
    result = invoke("verify", str(out / "model.onnx"), "--checkpoint", str(out / "quantized.pt"), "--data", str(EXAMPLE / "calib"))
    assert result.exit_code == 0, result.output
    text = step_summary.read_text()
    assert text.startswith("earlier step\n### fddaq verify: model.onnx") and "| ONNX vs fake-quant top-1 agreement" in text


def test_sensitivity_writes_a_ranked_table_a_chart_and_json(tmp_path):
    result = invoke("sensitivity", *MODEL_ARGS, "--calib", str(EXAMPLE / "calib"), "--bits", "4", "--quiet",
                    "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "sensitivity.json").read_text())["sensitivity"]
    assert set(report["splits"]) == {"W4A8", "W8A4", "W4A4"}
    assert len(report["quantizers"]) == 20  # 10 layers: weights and inputs
    assert "all at W4A8" in result.output and "stem.0 weight (4 bits)" in result.output
    assert (tmp_path / "sensitivity.png").read_bytes().startswith(b"\x89PNG")
    assert "[sensitivity]" in (tmp_path / "config.toml").read_text()


@pytest.mark.parametrize("command", ["quantize", "synth", "export", "verify", "plan", "sensitivity", "eval"])
def test_help_renders_flags_as_flags_and_examples_unbroken(command, monkeypatch):
    """typer 0.27+ printed `--force <bool>` (and `--force true` is a usage error) and
    `{model}` in the usage line; examples broke mid-command."""
    monkeypatch.setenv("COLUMNS", "300")
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output and "{" not in result.output.splitlines()[1]
    example = next(line for line in result.output.splitlines() if "Example:" in line)
    assert example.strip().endswith(("out/", "synth/", "model.onnx", "./val", "'fc=8'", "--bits 4", "val")), example


def test_config_keys_are_the_flags_names(tmp_path):
    """Regression: `json = ...` (the flag --json, whose parameter is json_path) was refused, and
    the error listed `json-path`, which is no flag."""
    import typer

    from cli.config_file import read_config
    from cli.main import app
    from fddaq.errors import ConfigError

    command = typer.main.get_command(app).commands["verify"]
    config = tmp_path / "run.toml"
    config.write_text('json = "r.json"\nonnx-file = "m.onnx"\nmin_agreement = 98.0\n')
    assert read_config(config, command) == {"json_path": str(tmp_path / "r.json"), "onnx_file": str(tmp_path / "m.onnx"),
                                            "min_agreement": 98.0}
    config.write_text("jsn = 1\n")
    with pytest.raises(ConfigError, match="options: checkpoint, data, force, json, min-agreement, onnx-file, quiet"):
        read_config(config, command)
