"""Each mistake a user makes gets one `Error:` line naming it and what would fix it, exit code
1, no traceback and nothing written."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from cli_helpers import EXAMPLE, invoke

CLASSES = sorted(p.name for p in (EXAMPLE / "calib").iterdir())


def copy_calib(root: Path, per_class: int = 1) -> Path:
    calib = root / "calib"
    if calib.exists():
        return calib
    for name in CLASSES:
        (calib / name).mkdir(parents=True)
        for image in sorted((EXAMPLE / "calib" / name).glob("*.png"))[:per_class]:
            shutil.copy(image, calib / name)
    return calib


def quantize(root: Path, *args: str, model: Path | None = None, calib: Path | None = None):
    model = model or EXAMPLE / "model.pth"
    calib = calib or copy_calib(root)
    return invoke("quantize", str(model), "--arch", "fddaq:fashion_resnet", "--calib", str(calib),
                  "--steps", "0", "--synthetic", "0", "--quiet", "--out", str(root / "out"), *args)


def expect_error(result, root: Path, message: str) -> None:
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and message in result.output, result.output
    assert result.output.strip().count("\n") == 0 and "Traceback" not in result.output
    assert not (root / "out").exists()


def test_model_file_mistakes(tmp_path):
    expect_error(quantize(tmp_path, model=tmp_path / "nope.pth"), tmp_path, "model file")
    (tmp_path / "noise.pth").write_bytes(b"\x80\x04not a torch file")
    expect_error(quantize(tmp_path, model=tmp_path / "noise.pth"), tmp_path, "is not a readable PyTorch file")
    state = torch.load(EXAMPLE / "model.pth", weights_only=True)
    state["fc.weight"] = state["fc.weight"][:5]
    del state["stem.0.weight"]
    state["head.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "other.pth")
    expect_error(quantize(tmp_path, model=tmp_path / "other.pth"), tmp_path,
                 "does not fit architecture fddaq:fashion_resnet: missing: stem.0.weight (1); "
                 "unexpected: head.weight (1); shape mismatch: fc.weight (1)")
    for value, name in ((float("inf"), "fc.weight"), (float("nan"), "stages.0.0.bn1.running_var")):
        state = torch.load(EXAMPLE / "model.pth", weights_only=True)
        state[name].view(-1)[:2] = value
        torch.save(state, tmp_path / "broken.pth")
        expect_error(quantize(tmp_path, model=tmp_path / "broken.pth"), tmp_path,
                     f"broken.pth: {name} holds 2 non-finite values (NaN or inf) of")


def test_image_folder_mistakes(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    expect_error(quantize(tmp_path, calib=empty), tmp_path, "holds no image files")
    expect_error(quantize(tmp_path, calib=tmp_path / "missing"), tmp_path, "does not exist")

    junk = tmp_path / "junk"
    (junk / CLASSES[0]).mkdir(parents=True)
    for i in range(3):
        (junk / CLASSES[0] / f"{i}.png").write_bytes(b"not an image")
    expect_error(quantize(tmp_path, calib=junk), tmp_path, "none of the 3 files in")

    expect_error(quantize(tmp_path, "--input-size", "64", calib=copy_calib(tmp_path / "a")), tmp_path,
                 "smaller than the 64x64 crop: use larger images or set --resize")

    extra = copy_calib(tmp_path / "b")
    (extra / "zebra").mkdir()
    shutil.copy(next((EXAMPLE / "calib" / CLASSES[0]).glob("*.png")), extra / "zebra")
    expect_error(quantize(tmp_path, calib=extra), tmp_path, "has 11 class folders but the model has 10 outputs")
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES))
    expect_error(quantize(tmp_path, "--classes", str(tmp_path / "classes.txt"), calib=extra), tmp_path,
                 "class folders the model does not know: zebra")


def test_corrupt_files_are_skipped_and_counted(tmp_path):
    calib = copy_calib(tmp_path)
    (calib / CLASSES[0] / "broken.png").write_bytes(b"\x89PNG truncated")
    (calib / CLASSES[1] / "notes.jpg").write_bytes(b"hello")
    result = quantize(tmp_path, calib=calib)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "out" / "report.json").read_text())["data"]
    assert data["calib_images"] == 10 and data["calib_skipped"] == 2
    assert "10 (10 class folders, 2 unreadable files skipped)" in (tmp_path / "out" / "summary.md").read_text()
    for i in range(12):  # more unreadable files than readable ones: refused before any work
        (calib / CLASSES[2] / f"junk{i}.png").write_bytes(b"junk")
    result = quantize(tmp_path, "--force", calib=calib)
    assert result.exit_code == 1 and "14 of the 24 image files" in result.output, result.output


def test_rgb_images_for_a_grey_model_are_converted(tmp_path):
    from PIL import Image

    calib = copy_calib(tmp_path)
    for image in calib.glob("*/*.png"):
        Image.open(image).convert("RGB").save(image)  # what a user exporting from a viewer gets
    assert quantize(tmp_path, calib=calib).exit_code == 0


def test_option_mistakes(tmp_path):
    expect_error(quantize(tmp_path, "--bits", "9"), tmp_path, "weight_bits=9 is outside the supported 2..8 bits")
    expect_error(quantize(tmp_path, "--layer-bits", "classifier=8"), tmp_path, "layer override 'classifier=8' matches no layer")
    expect_error(quantize(tmp_path, "--arch", "torchvision:resnet1"), tmp_path, "unknown torchvision model")
    expect_error(quantize(tmp_path, "--arch", "mymodels:build"), tmp_path, "cannot import module 'mymodels'")
    expect_error(quantize(tmp_path, "--arch", "my.models:build"), tmp_path, "for a file, give its path: my/models.py:build")
    expect_error(quantize(tmp_path, "--device", "tpu"), tmp_path, "--device 'tpu' is not one of auto, cpu, cuda")


def test_a_gpu_that_is_not_there_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    expect_error(quantize(tmp_path, "--device", "cuda"), tmp_path, "--device cuda was requested but torch sees no CUDA GPU")
    result = invoke("eval", str(EXAMPLE / "model.pth"), "--arch", "fddaq:fashion_resnet", "--data",
                    str(copy_calib(tmp_path)), "--device", "cuda:1", "--quiet")
    expect_error(result, tmp_path, "--device cuda:1 was requested")


def test_checkpoint_from_another_format_version(tmp_path, quick_run):
    out, _ = quick_run
    data = torch.load(out / "quantized.pt", weights_only=True)
    recipe = json.loads(data["recipe"])
    recipe["format_version"] = 1
    data["recipe"] = json.dumps(recipe)
    buffer = io.BytesIO()
    torch.save(data, buffer)
    (tmp_path / "old.pt").write_bytes(buffer.getvalue())
    result = invoke("export", str(tmp_path / "old.pt"), "-o", str(tmp_path / "out" / "m.onnx"))
    expect_error(result, tmp_path, "has checkpoint format 1")
    assert "re-run `fddaq quantize`" in result.output


@pytest.mark.parametrize("command", ["quantize", "synth", "plan", "eval", "verify", "export"])
def test_every_command_has_help_with_a_working_example(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0 and "Example: fddaq " + command in " ".join(result.output.split())


def test_an_unusable_out_or_output_path_is_refused_before_any_work(tmp_path):
    def refused(result, message):
        assert result.exit_code == 1, result.output
        assert result.output.startswith("Error: ") and message in result.output, result.output
        assert "Traceback" not in result.output

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for out in (blocker, blocker / "sub"):
        refused(quantize(tmp_path, "--out", str(out)), "a_file is a file, not a folder")
    if Path("/sys").is_dir() and not os.access("/sys", os.W_OK):
        refused(quantize(tmp_path, "--out", "/sys/fddaq-out"), "cannot write in /sys")
    (tmp_path / "taken" / "model.onnx").mkdir(parents=True)
    refused(quantize(tmp_path, "--out", str(tmp_path / "taken"), "--force"), "holds folders named model.onnx")
    refused(invoke("export", str(tmp_path / "q.pt"), "-o", str(tmp_path), "--force"), "is a folder: give a file name")
    refused(invoke("export", str(tmp_path / "q.pt"), "-o", str(blocker / "m.onnx")), "a_file is a file, not a folder")


def test_a_class_order_that_does_not_match_the_model_is_warned_about(tmp_path):
    """Reversed --classes scored 0.7% float top-1 without a word."""
    (tmp_path / "classes.txt").write_text("\n".join(reversed(CLASSES)))
    result = quantize(tmp_path, "--classes", str(tmp_path / "classes.txt"))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["data"]["calib_float_top1"] < 20
    assert len(report["data"]["warnings"]) == 1 and "class order" in report["data"]["warnings"][0]
    assert "WARNING: class order" in (tmp_path / "out" / "summary.md").read_text()
    result = quantize(tmp_path, "--force")  # the right order: no warning
    assert json.loads((tmp_path / "out" / "report.json").read_text())["data"]["warnings"] == []


def test_an_architecture_module_in_the_current_folder_is_found(tmp_path, monkeypatch):
    """`--arch mymodule:build` with mymodule.py where the command runs, as `python -m` finds it."""
    (tmp_path / "mymodule.py").write_text("from fddaq.zoo.resnet import fashion_resnet as build\n")
    monkeypatch.chdir(tmp_path)
    result = quantize(tmp_path, "--arch", "mymodule:build", "--preset", "fashion-mnist")
    assert result.exit_code == 0, result.output


def test_a_model_without_batchnorm_is_told_what_works_instead_of_synthesis(tmp_path):
    (tmp_path / "plain.py").write_text(
        "from torch import nn\n"
        "def build(num_classes=10):\n"
        "    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))\n")
    import importlib.util

    spec = importlib.util.spec_from_file_location("plain", tmp_path / "plain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.save(module.build().state_dict(), tmp_path / "plain.pth")
    calib = copy_calib(tmp_path)
    args = ["quantize", str(tmp_path / "plain.pth"), "--arch", f"{tmp_path / 'plain.py'}:build", "--calib", str(calib),
            "--preset", "fashion-mnist", "--steps", "1", "--synth-steps", "1", "--quiet", "--out", str(tmp_path / "out")]
    result = invoke(*args, "--recipe", "fddaq", "--synthetic", "8")
    assert result.exit_code == 1, result.output
    assert "no BatchNorm2d layer" in result.output and "--synthetic 0, or --recipe reconstruct or ptq" in result.output
    assert invoke(*args, "--synthetic", "0", "--recipe", "fddaq").exit_code == 0


def test_a_classes_file_with_a_byte_order_mark_or_a_duplicate_name(tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join([*CLASSES[:-1], CLASSES[0]]))
    expect_error(quantize(tmp_path, "--classes", str(classes)), tmp_path,
                 f"lists class '{CLASSES[0]}' twice (lines 1 and 10 of the names)")
    classes.write_bytes(b"\xef\xbb\xbf" + "\n".join(CLASSES).encode())  # as Windows editors save UTF-8
    assert quantize(tmp_path, "--classes", str(classes)).exit_code == 0


def test_a_second_run_on_the_same_out_is_refused_while_the_first_runs(tmp_path):
    """Two runs on one folder overwrote each other's files without --force."""
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".fddaq.lock", "w+") as held:  # another run holds the lock
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242")
        held.flush()
        result = quantize(tmp_path, "--force")
        assert result.exit_code == 1 and "being written by another fddaq run (process 4242)" in result.output, result.output
        assert sorted(p.name for p in out.iterdir()) == [".fddaq.lock"]
    # the holder ended (its lock went with it) and left the file: the next run takes it
    result = quantize(tmp_path, "--force")
    assert result.exit_code == 0, result.output
    assert not (out / ".fddaq.lock").exists() and (out / "model.onnx").exists()
    # a failed run leaves no folder it created, parents included
    deep = tmp_path / "a" / "b" / "out"
    assert quantize(tmp_path, "--out", str(deep), model=tmp_path / "missing.pth").exit_code == 1  # fails inside the lock
    assert not (tmp_path / "a").exists()


def test_core_errors_name_settings_the_cli_gives_as_its_flags():
    from cli.main import flag_advice

    message = "give `num_classes`, `arch_arg` or `preset`; `not_an_option` stays as it is"
    assert flag_advice(message) == "give --num-classes, --arch-arg or --preset; `not_an_option` stays as it is"
