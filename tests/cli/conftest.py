import pytest
from cli_helpers import BASE, EXAMPLE, invoke


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """A short `quantize` run on the bundled example: (output folder, CliRunner result)."""
    out = tmp_path_factory.mktemp("run")
    result = invoke(*BASE, "--val", str(EXAMPLE / "val"), "--steps", "5",
                    "--synth-steps", "3", "--synthetic", "64", "--out", str(out))
    assert result.exit_code == 0, result.output
    return out, result
