"""The quantized result as plain tensors plus a JSON recipe: loads with `weights_only=True`,
no pickled classes, and rebuilds the fake-quant model from the architecture spec and plan."""

from __future__ import annotations

import copy
import io
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .data import Preprocess
from .errors import ModelError, first_line
from .models import build_model, input_channels, load_weights
from .quant.capture import capture
from .quant.fold import fold_batch_norms
from .quant.modules import QuantizedModel
from .quant.plan import LayerPlan
from .quant.prepare import prepare

FORMAT = "fddaq-checkpoint"
FORMAT_VERSION = 5  # 3: the float model's state plus each layer's quantizers and integer weights; 4: and every layer's
# bias; 5: and each activation quantizer's observed range


@dataclass(frozen=True)
class ModelInfo:
    """What is needed to rebuild and feed the model: architecture spec and its factory's
    arguments, number of classes (None: the architecture's default), preprocessing, class
    names and the name of the scored output."""

    arch: str
    num_classes: int | None
    preprocess: Preprocess
    class_names: tuple[str, ...]
    arch_args: tuple[str, ...] = ()
    output: str = "logits"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.preprocess.input_shape

    def to_json(self) -> dict:
        return {
            "arch": self.arch,
            "arch_args": list(self.arch_args),
            "num_classes": self.num_classes,
            "preprocess": self.preprocess.to_json(),
            "class_names": list(self.class_names),
            "output": self.output,
        }

    @classmethod
    def from_json(cls, data: dict) -> ModelInfo:
        return cls(data["arch"], data["num_classes"], Preprocess.from_json(data["preprocess"]), tuple(data["class_names"]),
                   tuple(data["arch_args"]), data["output"])


@dataclass(frozen=True)
class Checkpoint:
    model: QuantizedModel  # deployed: integer weights, BatchNorms folded (as exported), eval mode
    plan: LayerPlan
    info: ModelInfo
    recipe: dict  # everything stored besides tensors


def checkpoint_bytes(model: QuantizedModel, plan: LayerPlan, info: ModelInfo, extra: dict | None = None) -> bytes:
    """Serialise a fake-quant model in its deployed form (`fold_batch_norms`): its state dict
    and a JSON recipe string."""
    recipe = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fddaq_version": __version__,
        "torch_version": torch.__version__,
        "model": info.to_json(),
        "plan": plan.to_json(),
        "tensor_bits": plan.tensor_bits,
        "tensor_sites": [site.name for site in model.sites],
        **(extra or {}),
    }
    folded = model if model.deployed else fold_batch_norms(model)  # only read: no copy of a deployed model
    state = {k: v.detach().cpu().contiguous() for k, v in folded.state_dict().items()}
    buffer = io.BytesIO()
    torch.save({"recipe": json.dumps(recipe), "state_dict": state}, buffer)
    return buffer.getvalue()


def load_checkpoint(path: Path) -> Checkpoint:
    """Rebuild the fake-quant model saved by `checkpoint_bytes` (no code is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        recipe = json.loads(data["recipe"])
        state = data["state_dict"]
    except pickle.UnpicklingError as exc:  # torch's message would suggest weights_only=False
        raise ModelError(f"{path} is not an fddaq checkpoint (written by `fddaq quantize`)") from exc
    except Exception as exc:  # torch and json raise many types for a file that is not one
        raise ModelError(f"{path} is not an fddaq checkpoint (written by `fddaq quantize`): {first_line(exc)}") from exc
    if not isinstance(recipe, dict) or recipe.get("format") != FORMAT:
        raise ModelError(f"{path} is not an fddaq checkpoint (written by `fddaq quantize`)")
    if recipe.get("format_version") != FORMAT_VERSION:
        raise ModelError(
            f"{path} has checkpoint format {recipe.get('format_version')} (fddaq {recipe.get('fddaq_version')}); "
            f"this fddaq {__version__} reads format {FORMAT_VERSION}: re-run `fddaq quantize`"
        )
    try:
        info = ModelInfo.from_json(recipe["model"])
        plan = LayerPlan.from_json(recipe["plan"], recipe.get("tensor_bits"))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{path} is a damaged fddaq checkpoint ({first_line(exc)}): re-run `fddaq quantize`") from exc
    model = rebuild(info, plan)
    if [site.name for site in model.sites] != recipe.get("tensor_sites", []):
        raise ModelError(f"{path} quantizes other tensors between operators than this fddaq finds in architecture "
                         f"{info.arch}: re-run `fddaq quantize`")
    load_weights(model, state, f"{path} does not fit architecture {info.arch}")
    return Checkpoint(model.eval(), plan, info, recipe)


def rebuild(info: ModelInfo, plan: LayerPlan) -> QuantizedModel:
    """The deployed quantized model of `info` and `plan`, with random weights to be loaded."""
    model = build_model(info.arch, info.num_classes, info.arch_args).eval()
    if input_channels(model) != info.preprocess.channels:
        raise ModelError(f"architecture {info.arch} takes {input_channels(model)} input channels, "
                         f"the checkpoint's preprocessing {info.preprocess.channels}")
    found = capture(model, torch.zeros(1, *info.input_shape))
    return fold_batch_norms(prepare(model, found, plan, info.output))


def loop_state(step: int, rng: torch.Generator, **parts: Any) -> dict:
    """A resumable snapshot (copies, not live tensors) of a training loop after `step`: the state
    dict of each of `parts` (its model, optimizer, schedule...) by name, and the state of its
    random generator `rng`."""
    return copy.deepcopy({"step": step, "rng": rng.get_state(), **{name: part.state_dict() for name, part in parts.items()}})


def resume_loop(state: dict, rng: torch.Generator, **parts: Any) -> int:
    """`state` (a `loop_state`) loaded back into `parts` and `rng`; the step to run next."""
    for name, part in parts.items():
        part.load_state_dict(state[name])
    rng.set_state(state["rng"])
    return int(state["step"]) + 1
