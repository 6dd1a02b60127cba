"""The peer a user would pick instead of fddaq: onnxruntime's own post-training quantizer
(`quantize_static`, QDQ format, per-channel weights) on the float ONNX of a bundled
Fashion-MNIST model (the ResNet or the MobileNet), calibrated on the same images fddaq gets, scored like fddaq's rows in
RESULTS.md: top-1 of the quantized ONNX in onnxruntime on the full 10,000-image test set (issue 7).

    .venv/bin/python benchmarks/peers.py [--models resnet mobilenet] [--per-class 1 10] [--settings W8A8 W4A4 W4A4-fl8] [--methods MinMax Entropy Percentile] [--json FILE]

Settings, as fddaq names them: `W8A8`; `W4A4` (every layer's weights and activations at 4 bits,
INT4/UINT4, first and last included, the model input at 8 bits as in fddaq); `W4A4-fl8` (the
first and last layers at 8 bits). As in fddaq's graphs the logits stay float
(`OpTypesToExcludeOutputQuantization: Gemm`); onnxruntime quantizes every other tensor between
operators, its QDQ convention, which fddaq's `--activations all` follows (`W4A4-all` is the
same onnxruntime graph as `W4A4`, named for the fddaq row it faces). `-inputs` (`W8A8-inputs`,
`W4A4-inputs`) restricts onnxruntime to the inputs of Conv and Gemm nodes
(`op_types_to_quantize`, their outputs excluded), the tensor set of fddaq's `--activations
inputs`. onnxruntime has no 3-bit type: W3A3 has no peer. Calibration
images: the first N per class of `examples/fashion_mnist/calib`, as in `benchmarks/recipes.py`;
onnxruntime's calibrators are deterministic, so one run per setting stands for every seed. Each
quantization runs in a fresh process: its wall time and peak resident memory are reported.
Needs `apt-get install dataset-fashion-mnist`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fashion_mnist"
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(EXAMPLE))
import fmnist
from tables import header

SETTINGS = ("W8A8", "W4A4", "W4A4-fl8", "W8A8-inputs", "W4A4-inputs", "W4A4-all")
METHODS = ("MinMax", "Entropy", "Percentile")


def calibration_images(per_class: int) -> np.ndarray:
    """The first `per_class` images of each class folder, preprocessed like fddaq does."""
    from fddaq.data import load_image_folder, preset

    with tempfile.TemporaryDirectory() as tmp:
        for folder in sorted((EXAMPLE / "calib").iterdir()):
            (Path(tmp) / folder.name).mkdir()
            for png in sorted(folder.glob("*.png"))[:per_class]:
                shutil.copy(png, Path(tmp) / folder.name / png.name)
        return load_image_folder(Path(tmp), preset("fashion-mnist", 1)).images.numpy()


def float_onnx(path: Path, model: str) -> None:
    """The float ONNX of bundled model `model` (`fmnist.MODELS`)."""
    from exporters import export_float
    from fddaq.models import load_float_model

    path.write_bytes(export_float(load_float_model(*fmnist.model_source(model)), (1, 28, 28)).SerializeToString())


def quantize(float_path: Path, out: Path, images: np.ndarray, setting: str, method: str) -> None:
    """onnxruntime's quantize_static at `setting` with calibrator `method`."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:  # one image per batch: the histogram calibrators need equal batches
            self.batches = iter([{"input": images[i : i + 1]} for i in range(len(images))])

        def get_next(self):
            return next(self.batches, None)

    inputs_only = setting.endswith("-inputs")
    setting = setting.removesuffix("-inputs").removesuffix("-all")
    low = setting.startswith("W4")
    overrides: dict = {"input": [{"quant_type": QuantType.QUInt8}]} if low else {}  # the image at 8 bits, as fddaq
    if setting == "W4A4-fl8":
        layers = [n for n in onnx.load(str(float_path)).graph.node if n.op_type in ("Conv", "Gemm")]
        first, last = layers[0], layers[-1]
        overrides[first.input[1]] = [{"quant_type": QuantType.QInt8, "axis": 0}]
        overrides[last.input[1]] = [{"quant_type": QuantType.QInt8, "axis": 0}]
        overrides[last.input[0]] = [{"quant_type": QuantType.QUInt8}]
    with contextlib.redirect_stdout(sys.stderr):  # its calibrators print progress: keep stdout for the table
        quantize_static(
            str(float_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt4 if low else QuantType.QUInt8,
            weight_type=QuantType.QInt4 if low else QuantType.QInt8,
            calibrate_method=getattr(CalibrationMethod, method),
            # logits stay float, as in fddaq's graphs (quantizing them at 4 bits would make ties)
            extra_options={"TensorQuantOverrides": overrides,
                           "OpTypesToExcludeOutputQuantization": ["Conv", "Gemm"] if inputs_only else ["Gemm"]},
            op_types_to_quantize=["Conv", "Gemm"] if inputs_only else None,
        )


def run(float_path: str, model: str, per_class: int, setting: str, method: str) -> dict:
    """One peer row (in a fresh process)."""
    from recipes import test_set

    from exporters import run_onnx

    images = calibration_images(per_class)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "quantized.onnx"
        quantize(Path(float_path), out, images, setting, method)
        seconds = time.perf_counter() - start
        x, y = test_set()
        logits = run_onnx(str(out), x, optimize=True)
        size = out.stat().st_size
    return {
        "model": model, "per_class": per_class, "bits": setting, "method": f"onnxruntime {method}",
        "onnx_top1": 100.0 * float((logits.argmax(1) == y.numpy()).mean()), "seconds": seconds,
        "bytes": size, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(fmnist.MODELS), default=["resnet", "mobilenet"])
    parser.add_argument("--per-class", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    from recipes import test_set

    from exporters import run_onnx

    rows = []
    x, y = test_set()
    for model in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            float_path = Path(tmp) / "float.onnx"
            float_onnx(float_path, model)
            float_top1 = 100.0 * float((run_onnx(str(float_path), x).argmax(1) == y.numpy()).mean())
            for per_class in args.per_class:
                for setting in args.settings:
                    for method in args.methods:
                        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                            row = pool.submit(run, str(float_path), model, per_class, setting, method).result()
                        rows.append({**row, "float_top1": float_top1})
                        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(header("model", "per class", "setting", "method", "float top-1", "ONNX top-1", "quantize s", "peak RSS MiB", "size KiB"))
    for r in rows:
        print(f"| {r['model']} | {r['per_class']} | {r['bits']} | {r['method']} | {r['float_top1']:.2f} | {r['onnx_top1']:.2f} | "
              f"{r['seconds']:.1f} | {r['peak_rss_mib']:.0f} | {r['bytes'] / 1024:.1f} |")


if __name__ == "__main__":
    main()
