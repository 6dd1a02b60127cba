"""What an exported graph says about itself, in its `metadata_props`: written with the graph
(`onnx_metadata`) and read back (`read_metadata`) by whoever feeds it images and reads its
classes, such as `fddaq eval`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fddaq import __version__
from fddaq.checkpoint import ModelInfo
from fddaq.data import Preprocess
from fddaq.errors import ExportError, first_line
from fddaq.quant.plan import LayerPlan

from .runtime import load_onnx


def onnx_metadata(info: ModelInfo, plan: LayerPlan) -> dict[str, str]:
    """`metadata_props` of the exported graph: what a deployment needs to feed and read it."""
    def compact(value: object) -> str:
        return json.dumps(value, separators=(",", ":"))

    return {
        "fddaq_version": __version__,
        "layer_plan": compact(plan.to_json()),
        "preprocessing": compact(info.preprocess.to_json()),
        "class_names": compact(list(info.class_names)),
        "arch": info.arch,
        "scored_output": info.output,
    }


@dataclass(frozen=True)
class GraphMetadata:
    """How to feed an exported graph (`preprocess`) and read it: its classes, and the output
    fddaq scored (None in a graph written before it was recorded: its only output)."""

    preprocess: Preprocess
    class_names: tuple[str, ...]
    scored_output: str | None


def read_metadata(path: Path) -> GraphMetadata:
    """The metadata `onnx_metadata` wrote into the ONNX file at `path` (an ExportError when it is
    not an ONNX file, or has none)."""
    props = {prop.key: prop.value for prop in load_onnx(path, external_data=False).metadata_props}
    if "preprocessing" not in props or "class_names" not in props:
        raise ExportError(f"{path} has no fddaq metadata (preprocessing, class names): evaluate the float model "
                          "with --arch, or export the ONNX with fddaq")
    try:
        preprocess = Preprocess.from_json(json.loads(props["preprocessing"]))
        class_names = tuple(str(name) for name in json.loads(props["class_names"]))
    except (ValueError, TypeError, KeyError) as exc:
        raise ExportError(f"{path} has malformed fddaq metadata ({first_line(exc)}): re-export it") from exc
    return GraphMetadata(preprocess, class_names, props.get("scored_output"))
