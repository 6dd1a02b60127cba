"""`fddaq quantize` and `fddaq plan --data` with `--target-size / --target-drop`: each layer's weight
bits chosen for a budget."""

import json
import time

import tomllib
from cli_helpers import BASE, EXAMPLE, MODEL_ARGS, invoke


def test_an_impossible_size_is_refused_before_any_work(tmp_path):
    start = time.perf_counter()
    result = invoke(*BASE, "--target-size", "0.01", "--recipe", "ptq", "--out", str(tmp_path / "out"))
    assert result.exit_code == 1, result.output
    assert "below the smallest model the bit choices 4,8 allow" in result.output
    assert not (tmp_path / "out" / "report.json").exists()
    assert time.perf_counter() - start < 30  # loading and capturing the model; no calibration, no export


def test_a_size_budget_is_met_and_the_written_config_repeats_the_plan(tmp_path):
    out = tmp_path / "out"
    result = invoke(*BASE, "--target-size", "0.2", "--recipe", "ptq", "--out", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    searched = report["precision"]
    assert searched["met"] and searched["onnx_ratio"] <= 0.2 and report["size"]["ratio"] == searched["onnx_ratio"]
    bits = {entry["name"]: entry["weight_bits"] for entry in report["plan"]}
    assert set(bits.values()) == {4, 8}, bits  # mixed: W4 everywhere would be smaller, W8 too large
    assert all(entry["act_bits"] == 8 for entry in report["plan"][1:])  # activations at the widest choice
    assert any("bit search" in entry["reason"] for entry in report["layers"])
    assert (out / "precision.png").stat().st_size > 1000
    config = tomllib.loads((out / "config.toml").read_text())["quantize"]
    assert "target-size" not in config and len(config["layer-bits"]) == len(searched["searched"])
    again = tmp_path / "again"
    result = invoke("quantize", "--config", str(out / "config.toml"), "--out", str(again), "--quiet")
    assert result.exit_code == 0, result.output
    assert json.loads((again / "report.json").read_text())["precision"] is None  # no search this time
    assert (again / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()


def test_a_missed_drop_budget_exits_3_with_the_report_and_the_closest_plan(tmp_path):
    out = tmp_path / "out"
    result = invoke(*BASE, "--target-drop", "0", "--bit-choices", "2", "--act-bits", "2", "--recipe", "ptq",
                    "--out", str(out))
    assert result.exit_code == 3, result.output
    assert "Budget missed" in result.output
    searched = json.loads((out / "report.json").read_text())["precision"]
    assert not searched["met"] and searched["verdict"].startswith("missed") and searched["chosen"]["drop"] > 0
    assert (out / "precision.png").exists() and (out / "model.onnx").exists()


def test_plan_searches_the_bits_quantize_would_choose(tmp_path):
    """`plan --data` runs the search `quantize` runs on the same images: the same bits, shown
    with each searched layer's reason; a missed budget exits 3 with the closest plan."""
    out = tmp_path / "out"
    result = invoke(*BASE, "--target-size", "0.2", "--recipe", "ptq", "--out", str(out))
    assert result.exit_code == 0, result.output
    quantized = json.loads((out / "report.json").read_text())
    planned = tmp_path / "plan.json"
    result = invoke("plan", *MODEL_ARGS, "--data", str(EXAMPLE / "calib"), "--target-size", "0.2", "--quiet",
                    "--json", str(planned))
    assert result.exit_code == 0, result.output
    assert "bit search: met (at most 0.2x float)" in result.output and "(predicted)" in result.output
    plan = json.loads(planned.read_text())
    assert {e["name"]: e["weight_bits"] for e in plan["plan"]} == {e["name"]: e["weight_bits"] for e in quantized["plan"]}
    assert plan["precision"]["overrides"] == quantized["precision"]["overrides"]
    assert "bit search: KL from float" in result.output

    result = invoke("plan", *MODEL_ARGS, "--data", str(EXAMPLE / "calib"), "--target-drop", "0", "--bit-choices", "2",
                    "--act-bits", "2", "--quiet")
    assert result.exit_code == 3 and "Budget missed" in result.output, result.output
    for flags in (["--target-size", "0.2"], ["--data", str(EXAMPLE / "calib")]):  # each needs the other
        result = invoke("plan", *MODEL_ARGS, *flags)
        assert result.exit_code == 1 and "--data" in result.output, result.output
