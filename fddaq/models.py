"""Load float models safely and find their layers in execution order."""

from __future__ import annotations

import functools
import importlib
import inspect
import pickle
from pathlib import Path

import torch
from torch import nn

from .errors import ModelError, first_line
from .zoo import ZOO

LAYER_TYPES = (nn.Conv2d, nn.Linear)


def build_model(spec: str, num_classes: int | None = None) -> nn.Module:
    """Instantiate the architecture named by `spec` with random weights.

    `torchvision:<builder>`, `fddaq:<zoo name>` or `package.module:callable`."""
    prefix, sep, name = spec.partition(":")
    if not sep or not prefix or not name:
        raise ModelError(
            f"architecture spec {spec!r} is not of the form 'torchvision:NAME', 'fddaq:NAME' "
            "or 'package.module:callable'"
        )
    if num_classes is not None and num_classes < 1:
        raise ModelError(f"--num-classes={num_classes} must be at least 1")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if prefix == "fddaq":
        if name not in ZOO:
            raise ModelError(f"unknown architecture {spec!r}; fddaq's zoo has: {', '.join(sorted(ZOO))}")
        factory = ZOO[name].factory
    elif prefix == "torchvision":
        import torchvision

        available = torchvision.models.list_models(module=torchvision.models)
        if name not in available:
            raise ModelError(f"unknown torchvision classification model {name!r} (e.g. resnet18, mobilenet_v2)")
        factory = functools.partial(torchvision.models.get_model, name, weights=None)
    else:
        try:
            module = importlib.import_module(prefix)
        except ImportError as exc:
            raise ModelError(f"cannot import module {prefix!r} of architecture spec {spec!r}: {exc}") from exc
        factory = getattr(module, name, None)
        if not callable(factory):
            raise ModelError(f"module {prefix!r} has no callable {name!r} (architecture spec {spec!r})")
    if kwargs and prefix != "torchvision" and "num_classes" not in _parameters(factory):
        raise ModelError(f"{spec} does not take num_classes")
    try:
        model = factory(**kwargs)
    except Exception as exc:  # the factory is the user's (or torchvision's) code
        raise ModelError(f"building {spec}{f' with num_classes={num_classes}' if kwargs else ''} failed: {first_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _parameters(factory) -> tuple[str, ...]:
    try:
        return tuple(inspect.signature(factory).parameters)
    except (TypeError, ValueError):  # some builtins have no signature
        return ()


def read_state_dict(path: Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """A state dict of plain tensors, loaded with `weights_only=True` (no code runs).

    Accepts a bare state dict or one under a 'state_dict' or 'model' key. `trust`: the user
    trusts the file, so a pickled whole model (`torch.save(model)`) is unpickled, which runs
    code from the file, and its state dict taken."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as exc:
        if "unsupported global" not in str(exc).lower():  # torch's message would suggest weights_only=False
            raise ModelError(f"{path} is not a readable PyTorch file (not written by torch.save, or corrupt)") from exc
        raise ModelError(
            f"{path} is not a plain state dict: it pickles Python objects (e.g. a whole model saved with "
            "torch.save(model)), and unpickling them can run code from the file. Save model.state_dict() "
            "instead, or pass --trust-model if you trust the file"
        ) from exc
    except Exception as exc:  # torch raises many types for a file that is not a checkpoint
        raise ModelError(f"{path} is not a readable PyTorch file: {first_line(exc)}") from exc
    if isinstance(data, nn.Module):
        data = data.state_dict()
    for key in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(key), (dict, nn.Module)):
            data = data[key]
            data = data.state_dict() if isinstance(data, nn.Module) else data
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ModelError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return data


def load_float_model(path: Path, spec: str, num_classes: int | None = None, trust: bool = False) -> nn.Module:
    """The architecture `spec` with the weights of state dict `path`, in eval mode (`trust`:
    see `read_state_dict`)."""
    state = read_state_dict(path, trust)
    model = build_model(spec, num_classes)
    load_weights(model, state, f"{path} does not fit architecture {spec}")
    return model.eval()


def load_weights(model: nn.Module, state: dict, problem: str) -> None:
    """Load `state` into `model`, or a ModelError starting with `problem` that names the
    missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    if not isinstance(state, dict):
        raise ModelError(f"{problem}: it holds no state dict")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and getattr(state[k], "shape", None) != expected[k].shape]
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
            if keys:
                parts.append(f"{label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''} ({len(keys)})")
        hint = " (pass --num-classes?)" if wrong and not missing and not unexpected else ""
        raise ModelError(f"{problem}: {'; '.join(parts)}{hint}")
    model.load_state_dict(state)


def layer_execution_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the Conv2d/Linear modules in the order one forward pass calls them (each once)."""
    order: list[str] = []
    handles = [
        module.register_forward_pre_hook(lambda m, args, name=name: order.append(name) if name not in order else None)
        for name, module in model.named_modules()
        if isinstance(module, LAYER_TYPES)
    ]
    try:
        with torch.no_grad():
            model.eval()(example)
    except Exception as exc:
        raise ModelError(f"the model fails on an input of shape {tuple(example.shape)}: {exc}") from exc
    finally:
        for handle in handles:
            handle.remove()
    if not order:
        raise ModelError("the model has no Conv2d or Linear layer to quantize")
    return order


def input_channels(model: nn.Module) -> int:
    """Channels of the model input, from its first conv (1 = grey, 3 = RGB)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    raise ModelError("the model has no Conv2d layer, so its input channels are unknown")


def num_outputs(model: nn.Module, order: list[str]) -> int:
    """Number of classes: the output size of the last layer in execution order."""
    last = model.get_submodule(order[-1])
    return last.out_features if isinstance(last, nn.Linear) else last.out_channels
