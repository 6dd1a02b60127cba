"""The metadata an exported graph carries, written and read back in one module."""

from __future__ import annotations

import pytest

from exporters import export_qdq
from exporters.metadata import onnx_metadata, read_metadata
from fddaq.checkpoint import ModelInfo
from fddaq.config import QuantConfig
from fddaq.data import Preprocess
from fddaq.errors import ExportError
from fddaq.quant.plan import resolve_layer_plan


def test_what_the_export_writes_reads_back(tmp_path, export_resnet, images, quantized):
    qmodel = quantized(export_resnet(), images, 4, 4)
    info = ModelInfo("fddaq:tiny", 10, Preprocess(16, (0.5,), (0.25,), 3, resize=20), tuple("abcdefghij"), output="head")
    path = tmp_path / "model.onnx"
    path.write_bytes(export_qdq(qmodel, onnx_metadata(info, resolve_layer_plan(qmodel.capture, QuantConfig(4, 4)))).SerializeToString())
    found = read_metadata(path)
    assert found.preprocess == info.preprocess and found.class_names == info.class_names
    assert found.scored_output == "head"

    bare = tmp_path / "bare.onnx"
    bare.write_bytes(export_qdq(qmodel).SerializeToString())
    with pytest.raises(ExportError, match="bare.onnx has no fddaq metadata"):
        read_metadata(bare)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(export_qdq(qmodel, {"preprocessing": "{", "class_names": "[]"}).SerializeToString())
    with pytest.raises(ExportError, match="broken.onnx has malformed fddaq metadata"):
        read_metadata(broken)

