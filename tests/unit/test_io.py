import json
import math
import os
import stat

import pytest

from fddaq.io import atomic_write_bytes, atomic_write_json, strict_json


def test_json_files_are_strict_json_with_null_for_nan_and_infinity(tmp_path):
    report = {"first_loss": math.nan, "curve": [1.0, math.inf, -math.inf], "nested": {"x": (math.nan, 2)}, "n": 3, "s": "nan"}
    atomic_write_json(tmp_path / "report.json", report)
    strict = lambda constant: pytest.fail(f"report.json holds {constant}")
    loaded = json.loads((tmp_path / "report.json").read_text(), parse_constant=strict)
    assert loaded == {"first_loss": None, "curve": [1.0, None, None], "nested": {"x": [None, 2]}, "n": 3, "s": "nan"}
    assert strict_json(report)["n"] == 3


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_permissions_open_would_give_them(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "model.onnx", b"x")
        with open(tmp_path / "plain", "wb"):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "model.onnx").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == mode


def test_an_overwritten_file_keeps_its_mode(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("{}")
    path.chmod(0o640)
    atomic_write_json(path, {"a": 1})
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and json.loads(path.read_text()) == {"a": 1}


def test_tensor_files_read_back_and_others_are_named_as_not_what_was_expected(tmp_path):
    import torch

    from fddaq.errors import DataError
    from fddaq.io import read_tensors, tensors_bytes

    path = tmp_path / "state.pt"
    path.write_bytes(tensors_bytes({"x": torch.arange(3)}))
    assert torch.equal(read_tensors(path, "a state", DataError)["x"], torch.arange(3))
    with pytest.raises(DataError, match="missing.pt does not exist .a state is needed there."):
        read_tensors(tmp_path / "missing.pt", "a state", DataError)
    (tmp_path / "junk.pt").write_text("not a tensor file")
    with pytest.raises(DataError, match="junk.pt is not a state"):
        read_tensors(tmp_path / "junk.pt", "a state", DataError)
