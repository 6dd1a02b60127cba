"""Random option combinations, and random bytes as model, image, checkpoint and ONNX files:
whatever the input, the user sees a result or one `Error:` line (exit 1) or a usage message
(exit 2), never a traceback, and a failed run writes nothing."""

from __future__ import annotations

import tempfile
from pathlib import Path

from cli_helpers import EXAMPLE, invoke
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

VALUES = {
    "--arch": ["fddaq:fashion_resnet", "fddaq:nope", "torchvision:resnet18", "torchvision:nope", "os:getcwd",
               "json:loads", "nomodule.at_all:build", "a:b:c", ""],
    "--bits": ["1", "2", "4", "8", "9", "-3", "x"],
    "--weight-bits": ["3", "0", "x"],
    "--act-bits": ["6", "12"],
    "--first-last-bits": ["8", "1"],
    "--layer-bits": ["fc=8", "nope=4", "fc", "fc=float", "*=9", "stem.0=4/8", "=4", "fc=4/4/4", "stem.*=x", "*=float",
                     "*=8/4"],
    "--recipe": ["fddaq", "ptq", "fdda-paper", "nope"],
    "--steps": ["0", "-1", "x"],
    "--synthetic": ["0", "-5"],
    "--input-size": ["0", "-5", "16", "28", "29", "100000", "x"],
    "--resize": ["28", "10", "99999999"],
    "--mean": ["0.5", "a,b", "0.1,0.2,0.3", "", "nan"],
    "--std": ["0", "0.5", "-1", "x", "inf"],
    "--preset": ["imagenet", "nope", "fashion-mnist", "efficientnet-lite"],
    "--num-classes": ["0", "10", "3", "-1", "x"],
    "--max-drop": ["1", "-1", "x"],
    "--seed": ["0", "-7", "x"],
    "--classes": ["{classes}", "{bom_classes}", "{duplicate_classes}", "/no/such/classes.txt"],
}


QUANTIZE_ONLY = {"--recipe", "--steps", "--synthetic", "--max-drop", "--seed"}


@st.composite
def options(draw) -> list[tuple[str, str]]:
    chosen = draw(st.lists(st.sampled_from(sorted(VALUES)), max_size=5, unique=True))
    return [(name, draw(st.sampled_from(VALUES[name]))) for name in chosen]


def flat(pairs: list[tuple[str, str]]) -> list[str]:
    return [item for pair in pairs for item in pair]


def make_files(root: Path, model: bytes | None, image: bytes | None) -> tuple[Path, Path]:
    """A model file (the bundled weights, or random bytes), a class-folder image folder (the
    bundled images, or one of random bytes among them) and classes files (plain, with a byte
    order mark, with a duplicate name)."""
    names = [folder.name for folder in sorted((EXAMPLE / "calib").iterdir())]
    (root / "classes.txt").write_text("\n".join(names))
    (root / "bom_classes.txt").write_bytes(b"\xef\xbb\xbf" + "\n".join(names).encode())
    (root / "duplicate_classes.txt").write_text("\n".join([*names[:-1], names[0]]))
    path = root / "model.pth"
    path.write_bytes((EXAMPLE / "model.pth").read_bytes() if model is None else model)
    calib = root / "calib"
    for folder in sorted((EXAMPLE / "calib").iterdir())[:10]:
        (calib / folder.name).mkdir(parents=True)
        source = next(folder.glob("*.png"))
        (calib / folder.name / source.name).write_bytes(source.read_bytes())
    if image is not None:
        (calib / sorted(p.name for p in calib.iterdir())[0] / "noise.png").write_bytes(image)
    return path, calib


def check(result, out: Path | None = None) -> None:
    assert "Traceback" not in result.output, result.output
    assert result.exit_code in (0, 1, 2), (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if result.exit_code == 1:
        error = result.output[result.output.index("Error: "):].strip()
        assert "\n" not in error, result.output  # one line
        if out is not None:
            assert not out.exists() or not any(out.iterdir()), "a failed run wrote outputs"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(args=options(), model=st.none() | st.binary(max_size=256), image=st.none() | st.binary(max_size=64))
def test_quantize_and_plan_never_show_a_traceback(args, model, image):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_path, calib = make_files(root, model, image)
        out = root / "out"
        args = [(name, value.format(**{k: root / f"{k}.txt" for k in ("classes", "bom_classes", "duplicate_classes")}))
                for name, value in args]
        plan_args = flat([(name, value) for name, value in args if name not in QUANTIZE_ONLY | {"--classes"}])
        check(invoke("plan", str(model_path), "--arch", "fddaq:fashion_resnet", *plan_args))
        result = invoke("quantize", str(model_path), "--arch", "fddaq:fashion_resnet", "--calib", str(calib),
                        "--steps", "0", "--synthetic", "0", "--quiet", "--out", str(out), *flat(args))
        check(result, out)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=512), suffix=st.sampled_from([".onnx", ".pt", ".pth"]))
def test_random_bytes_as_checkpoint_or_onnx_file(data, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"file{suffix}"
        path.write_bytes(data)
        out = Path(tmp) / "exported.onnx"
        check(invoke("eval", str(path), "--data", str(EXAMPLE / "calib")))
        check(invoke("export", str(path), "-o", str(out)))
        assert not out.exists()
        check(invoke("verify", str(path), "--checkpoint", str(path), "--data", str(EXAMPLE / "calib")))
