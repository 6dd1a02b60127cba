import json

import numpy as np
import onnx
import pytest
from cli_helpers import BASE, EXAMPLE, invoke

from exporters import run_onnx
from exporters.runtime import newest_runnable_opset
from fddaq import __version__


def test_quantize_writes_checkpoint_onnx_and_report(quick_run):
    out, result = quick_run
    report = json.loads((out / "report.json").read_text())
    assert report["fddaq_version"] == __version__
    # regression guards, bounds below what was measured (2026-11-30: calibration 97.0, val 92.85, size 0.171x)
    assert report["data"].pop("calib_float_top1") > 90
    assert report["data"] == {
        "calib_images": 100, "calib_skipped": 0, "calib_layout": "10 class folders", "calib_labelled": True,
        "val_images": 2000, "val_skipped": 0,
        "verify_set": "val", "warnings": [],
    }
    assert [e["name"] for e in report["plan"]][0] == "stem.0" and report["plan"][-1]["name"] == "fc"
    assert all(e["weight_bits"] == 4 for e in report["plan"])
    acc = report["accuracy"]
    assert acc["float_top1"] > 90
    assert acc["onnx_vs_fake_quant_agreement"] >= 99.5
    assert abs(acc["onnx_top1"] - acc["fake_quant_top1"]) <= 0.5
    assert report["size"]["ratio"] < 0.25
    assert set(report["timings_s"]) >= {"load", "calibrate", "finetune", "evaluate", "export", "verify", "total"}
    assert "ONNX top-1 (val)" in result.output
    assert report["synthesis"]["images"] == 64 and (out / "preview.png").exists()
    assert report["synthesis_choice"] == "64 synthetic images, set by the recipe and the options"


def test_export_from_checkpoint_alone_reproduces_the_graph(quick_run, tmp_path):
    out, _ = quick_run
    result = invoke("export", str(out / "quantized.pt"), "-o", str(tmp_path / "again.onnx"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "again.onnx").read_bytes() == (out / "model.onnx").read_bytes()


def test_export_can_store_4bit_weights_as_int8(quick_run, tmp_path):
    out, _ = quick_run
    result = invoke("export", str(out / "quantized.pt"), "-o", str(tmp_path / "int8.onnx"), "--int8-weights")
    assert result.exit_code == 0, result.output
    graph, before = onnx.load(str(tmp_path / "int8.onnx")).graph, onnx.load(str(out / "model.onnx")).graph
    types = {t.data_type for t in graph.initializer if t.name.endswith(".w_q")}
    assert types == {onnx.TensorProto.INT8} and onnx.TensorProto.INT4 in {t.data_type for t in before.initializer}
    x = np.random.default_rng(0).random((4, 1, 28, 28), np.float32)
    assert np.array_equal(run_onnx(tmp_path / "int8.onnx", x), run_onnx(out / "model.onnx", x))


def test_export_refuses_an_opset_the_installed_onnxruntime_cannot_run(quick_run, tmp_path):
    """A newer onnx knows opsets that onnxruntime does not run yet ("NOT_IMPLEMENTED
    QuantizeLinear(28)" on loading); such a file was written with exit 0."""
    newest = newest_runnable_opset()
    out, _ = quick_run
    result = invoke("export", str(out / "quantized.pt"), "-o", str(tmp_path / "newest.onnx"), "--opset", str(newest))
    assert result.exit_code == 0, result.output
    assert run_onnx(tmp_path / "newest.onnx", np.zeros((1, 1, 28, 28), np.float32)).shape == (1, 10)
    if newest == onnx.defs.onnx_opset_version():
        pytest.skip(f"the installed onnxruntime runs every opset the installed onnx knows ({newest})")
    result = invoke("export", str(out / "quantized.pt"), "-o", str(tmp_path / "new.onnx"), "--opset", str(newest + 1))
    assert result.exit_code == 1 and f"runs Q/DQ graphs up to opset {newest}" in result.output, result.output
    assert not (tmp_path / "new.onnx").exists()


def test_existing_outputs_need_force(quick_run):
    out, _ = quick_run
    before = (out / "report.json").read_bytes()
    result = invoke(*BASE, "--steps", "0", "--out", str(out))
    assert result.exit_code == 1
    assert "already holds quantized.pt" in result.output and "--force" in result.output
    assert (out / "report.json").read_bytes() == before


def test_quality_gate_exits_3_after_writing_the_report(tmp_path):
    result = invoke(*BASE, "--val", str(EXAMPLE / "val"), "--steps", "0", "--bits", "2",
                    "--max-drop", "0.5", "--out", str(tmp_path))
    assert result.exit_code == 3, result.output
    assert "Quality gate failed" in result.output
    gate = json.loads((tmp_path / "report.json").read_text())["gate"]
    assert gate["drop"] > 0.5 and gate["max_drop"] == 0.5 and gate["passed"] is False  # the outcome is recorded
    assert "| quality gate (--max-drop) | FAILED:" in (tmp_path / "summary.md").read_text()
    assert f"{tmp_path / 'preview.png'}" not in result.output  # no synthesis, no preview


@pytest.mark.parametrize(
    "args, message",
    [
        (("--arch", "fddaq:nope"), "unknown architecture 'fddaq:nope'"),
        (("--bits", "9"), "weight_bits=9 is outside the supported 2..8 bits"),
        (("--calib", "/no/such/folder"), "image folder /no/such/folder does not exist"),
        (("--max-drop", "1"), "--max-drop needs --val"),
        (("--mean", "a,b"), "--mean='a,b' must be comma-separated numbers"),
    ],
)
def test_user_errors_are_one_line_without_traceback(tmp_path, args, message):
    result = invoke(*BASE, "--steps", "0", "--out", str(tmp_path / "o"), *args)
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_verify_command_measures_the_exported_graph(quick_run, tmp_path):
    out, _ = quick_run
    args = ["verify", str(out / "model.onnx"), "--checkpoint", str(out / "quantized.pt")]
    result = invoke(*args, "--data", str(EXAMPLE / "calib"), "--json", str(tmp_path / "verify.json"))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "verify.json").read_text())
    verify = report["verify"]
    assert verify["samples"] == 100 and verify["agreement"] == verify["optimized_agreement"] == 100.0
    # rare one-step flips from the float summation order (measured: 1.4e-4 of the values)
    assert 0 <= verify["activation_mismatches"] <= 1e-3 * verify["activation_values"]
    assert verify["activation_max_step_diff"] <= 1
    assert verify["local_mismatches"] <= 1e-3 * verify["activation_values"] and verify["local_max_step_diff"] <= 1
    assert verify["onnx_top1"] == verify["torch_top1"] > 80  # regression guard: measured 97.0 (2026-11-30)
    assert report["gate"] == {"min_agreement": 99.0, "passed": True, "failures": []}
    assert "quantized activations that differ" in result.output

    # the graph of another model (2-bit, calibration only) fails the agreement gate: exit 3
    other = tmp_path / "other"
    assert invoke(*BASE, "--steps", "0", "--bits", "2", "--out", str(other)).exit_code == 0
    result = invoke("verify", str(other / "model.onnx"), "--checkpoint", str(out / "quantized.pt"),
                    "--data", str(EXAMPLE / "calib"), "--min-agreement", "99.9")
    assert result.exit_code == 3, result.output
    assert "Verification failed" in result.output

    # the same computation under other tensor names (a graph fddaq did not write) agrees on
    # every image, but no quantized activation can be compared: that fails, not "0 of 0"
    graph = onnx.load(str(out / "model.onnx"))
    keep = {v.name for v in [*graph.graph.input, *graph.graph.output, *graph.graph.initializer]}
    for node in graph.graph.node:
        node.input[:] = [n if n in keep or not n else f"foreign/{n}" for n in node.input]
        node.output[:] = [n if n in keep else f"foreign/{n}" for n in node.output]
    onnx.save(graph, tmp_path / "foreign.onnx")
    result = invoke("verify", str(tmp_path / "foreign.onnx"), "--checkpoint", str(out / "quantized.pt"),
                    "--data", str(EXAMPLE / "calib"), "--json", str(tmp_path / "foreign.json"))
    assert result.exit_code == 3 and "no quantized activation of the checkpoint could be compared" in " ".join(result.output.split())
    report = json.loads((tmp_path / "foreign.json").read_text())
    assert report["verify"]["agreement"] == 100.0 and report["verify"]["activation_values"] == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (("missing.onnx",), "ONNX file missing.onnx does not exist"),
        (("{garbage}",), "garbage.onnx is not a readable ONNX file"),
        (("{out}/model.onnx", "--data", "/no/such/folder"), "image folder /no/such/folder does not exist"),
        (("{out}/model.onnx", "--min-agreement", "120"), "--min-agreement=120.0 must be within 0..100"),
    ],
)
def test_verify_errors(quick_run, tmp_path, args, message):
    out, _ = quick_run
    (tmp_path / "garbage.onnx").write_bytes(b"\xff\xfe\x00not a graph" * 10)
    args = [a.format(out=out, garbage=tmp_path / "garbage.onnx") for a in args]
    defaults = {"--checkpoint": str(out / "quantized.pt"), "--data": str(EXAMPLE / "calib")}
    options = [v for k, d in defaults.items() if k not in args for v in (k, d)]
    result = invoke("verify", *args, *options)
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and message in result.output


def test_export_errors_and_version(tmp_path):
    result = invoke("export", str(tmp_path / "missing.pt"), "-o", str(tmp_path / "m.onnx"))
    assert result.exit_code == 1 and "checkpoint" in result.output and "does not exist" in result.output
    result = invoke("--version")
    assert result.exit_code == 0 and __version__ in result.output


def test_interrupted_run_resumes_to_the_same_model(tmp_path, monkeypatch):
    args = [*BASE, "--recipe", "fddaq", "--steps", "120", "--synth-steps", "3", "--synthetic", "32"]
    result = invoke(*args, "--out", str(tmp_path / "straight"))
    assert result.exit_code == 0, result.output

    import cli.render

    original = cli.render.ProgressRenderer.__call__

    def interrupt_at_step_70(self, event):
        if event.stage == "finetune" and event.step == 70:
            raise KeyboardInterrupt
        original(self, event)

    monkeypatch.setattr(cli.render.ProgressRenderer, "__call__", interrupt_at_step_70)
    out = tmp_path / "interrupted"
    result = invoke(*args, "--out", str(out))
    assert result.exit_code == 130 and "--resume" in result.output
    assert (out / "resume.pt").exists() and not (out / "model.onnx").exists()
    monkeypatch.setattr(cli.render.ProgressRenderer, "__call__", original)

    result = invoke(*args, "--steps", "121", "--out", str(out), "--resume")
    assert result.exit_code == 1 and "other options" in result.output
    import torch  # the same options on a changed weights file: refused, not continued with the old student

    state = torch.load(EXAMPLE / "model.pth", weights_only=True)
    state["fc.bias"] += 0.01
    torch.save(state, tmp_path / "changed.pth")
    result = invoke(*[str(tmp_path / "changed.pth") if a == str(EXAMPLE / "model.pth") else a for a in args],
                    "--out", str(out), "--resume")
    assert result.exit_code == 1 and "another model file or other calibration images" in result.output, result.output
    saved = (out / "resume.pt").read_bytes()
    older = torch.load(out / "resume.pt", weights_only=True)
    older["format"] = 0  # as another version of fddaq would have written it
    torch.save(older, out / "resume.pt")
    result = invoke(*args, "--out", str(out), "--resume")
    assert result.exit_code == 1 and "written by another version of fddaq" in result.output, result.output
    (out / "resume.pt").write_bytes(saved)
    result = invoke(*args, "--out", str(out), "--resume")
    assert result.exit_code == 0, result.output
    assert not (out / "resume.pt").exists()
    assert (out / "model.onnx").read_bytes() == (tmp_path / "straight" / "model.onnx").read_bytes()
    report = json.loads((out / "report.json").read_text())
    assert report["finetune"]["resumed_from"] == 50


def test_resume_without_a_saved_state_is_a_clear_error(tmp_path):
    result = invoke(*BASE, "--steps", "1", "--out", str(tmp_path), "--resume")
    assert result.exit_code == 1 and "nothing to resume" in result.output


def test_recipes_ptq_and_paper(tmp_path):
    result = invoke(*BASE, "--recipe", "ptq", "--out", str(tmp_path / "ptq"))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "ptq" / "report.json").read_text())
    assert report["config"]["recipe"] == "ptq" and report["synthesis"] is None
    assert report["synthesis_choice"] == "no synthetic images, set by the recipe and the options"
    assert report["finetune"]["steps"] == 0
    result = invoke(*BASE, "--recipe", "fdda-paper", "--steps", "5", "--synthetic", "16", "--synth-steps", "2",
                    "--out", str(tmp_path / "paper"))
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "paper" / "report.json").read_text())["config"]
    assert config["finetune"]["optimizer"] == "sgd" and config["finetune"]["temperature"] == 20.0


@pytest.mark.slow
def test_a_killed_process_resumes(tmp_path):
    """SIGKILL in the middle of fine-tuning (no cleanup runs): the last state written every 50
    steps remains, nothing else is there, and --resume finishes the run."""
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "out"
    command = [sys.executable, "-c", "from cli.main import main; main()", *BASE[:-1], "--recipe", "fddaq", "--steps", "300",
               "--synthetic", "0", "--out", str(out)]
    env = {**os.environ, "COLUMNS": "200", "FDDAQ_PROGRESS_SECONDS": "0"}  # every 10% line, however fast
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in process.stdout:  # plain progress lines: not a terminal
        if "Fine-tuning (distillation): 120/300" in line:
            break
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert (out / "resume.pt").exists() and not (out / "model.onnx").exists() and not (out / "report.json").exists()

    result = subprocess.run([*command, "--resume", "--quiet"], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["finetune"]["resumed_from"] in (50, 100) and report["finetune"]["steps"] == 300
    assert not (out / "resume.pt").exists()


def test_progress_lines_leave_out_stages_with_no_steps():
    import io

    from rich.console import Console

    from cli.render import ProgressRenderer
    from fddaq.events import Event

    console = Console(file=io.StringIO(), width=120)
    with ProgressRenderer(console) as render:
        for event in (Event("reconstruct", 0, 2, {}), Event("reconstruct", 2, 2, {}), Event("finetune", 0, 0, {})):
            render(event)
    printed = console.file.getvalue()
    assert "Reconstructing blocks: 2 steps" in printed and "2/2" in printed and "Fine-tuning" not in printed


def test_piped_progress_prints_at_most_one_line_per_interval_besides_start_and_end(monkeypatch):
    """A 12-step stage printed all 12 steps to a log."""
    import io

    from rich.console import Console

    import cli.render
    from cli.render import ProgressRenderer
    from fddaq.events import Event

    clock = iter([0.0, 1.0, 2.0, 3.0, 6.0, 7.0, 8.0, 12.0, 13.0, 14.0, 15.0, 16.0, 17.0])
    monkeypatch.setattr(cli.render.time, "perf_counter", lambda: next(clock, 99.0))
    console = Console(file=io.StringIO(), width=120)
    with ProgressRenderer(console) as render:
        for step in range(13):
            render(Event("calibrate", step, 12, {}))
    lines = console.file.getvalue().splitlines()
    assert [line.split(":")[1].split()[0] for line in lines] == ["12", "4/12", "7/12", "12/12"]


def test_synthetic_from_reuses_the_images_of_fddaq_synth(tmp_path):
    import torch

    result = invoke("synth", *BASE[1:-1], "--num", "32", "--steps", "3", "--quiet", "--out", str(tmp_path / "synth"))
    assert result.exit_code == 0, result.output
    args = [*BASE, "--recipe", "fddaq", "--steps", "4", "--synthetic", "32", "--synth-steps", "3"]
    result = invoke(*args, "--out", str(tmp_path / "made"))
    assert result.exit_code == 0, result.output
    synthetic = tmp_path / "synth" / "synthetic.pt"
    result = invoke(*args, "--synthetic-from", str(synthetic), "--out", str(tmp_path / "reused"))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "reused" / "report.json").read_text())
    assert report["synthesis"]["method"] == "file" and report["synthesis"]["source"] == str(synthetic)
    assert report["synthesis"]["images"] == 32 and "synthesize" not in report["timings_s"]
    assert report["synthesis_choice"] == f"32 synthetic images, given ({synthetic})"
    assert report["synthesis"]["quality"]["synthetic"]["float_top1"] > 50  # regression guard: measured 96.9 (2026-11-30)
    # the same images as the run that synthesized them: the same model
    assert (tmp_path / "reused" / "model.onnx").read_bytes() == (tmp_path / "made" / "model.onnx").read_bytes()

    torch.save({"images": torch.zeros(4, 3, 28, 28), "labels": torch.zeros(4, dtype=torch.long)}, tmp_path / "rgb.pt")
    (tmp_path / "junk.pt").write_text("not a tensor file")
    for path, flags, message in (
        (tmp_path / "rgb.pt", ("--steps", "2"), "the model takes float images (N, 1, 28, 28)"),
        (tmp_path / "junk.pt", ("--steps", "2"), "is not a synthetic.pt of `fddaq synth`"),
        (tmp_path / "none.pt", ("--steps", "2"), "does not exist"),
        (synthetic, ("--recipe", "ptq"), "would go unused"),
    ):
        result = invoke(*BASE, "--synthetic-from", str(path), *flags, "--out", str(tmp_path / "bad"))
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, result.output


def test_an_interrupted_synthesis_resumes_and_an_early_interrupt_says_there_is_nothing_to_resume(tmp_path, monkeypatch):
    import cli.render

    args = [*BASE, "--recipe", "fddaq", "--steps", "3", "--synth-steps", "60", "--synthetic", "32"]
    result = invoke(*args, "--out", str(tmp_path / "straight"))
    assert result.exit_code == 0, result.output
    original = cli.render.ProgressRenderer.__call__

    def interrupt_at(step):
        def handler(self, event):
            if event.stage == "synthesize" and event.step == step:
                raise KeyboardInterrupt
            original(self, event)
        return handler

    monkeypatch.setattr(cli.render.ProgressRenderer, "__call__", interrupt_at(20))  # before the first state (step 50)
    result = invoke(*args, "--out", str(tmp_path / "early"))
    assert result.exit_code == 130 and "Nothing was saved" in result.output and "--resume" not in result.output
    monkeypatch.setattr(cli.render.ProgressRenderer, "__call__", interrupt_at(55))
    out = tmp_path / "interrupted"
    result = invoke(*args, "--out", str(out))
    assert result.exit_code == 130 and "--resume" in result.output and (out / "resume.pt").exists()
    monkeypatch.setattr(cli.render.ProgressRenderer, "__call__", original)
    result = invoke(*args, "--out", str(out), "--resume")
    assert result.exit_code == 0, result.output
    assert (out / "model.onnx").read_bytes() == (tmp_path / "straight" / "model.onnx").read_bytes()
