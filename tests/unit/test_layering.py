import ast
from pathlib import Path

FORBIDDEN = {"typer", "rich", "onnx", "onnxruntime", "cli", "exporters"}


def test_core_never_imports_cli_or_onnx():
    core = Path(__file__).resolve().parents[2] / "fddaq"
    offenders = []
    for path in core.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert offenders == []
