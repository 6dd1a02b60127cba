"""Build architectures from their spec and load float models safely."""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib
import importlib.util
import inspect
import os
import pickle
import sys
from pathlib import Path

import torch
from torch import nn

from .errors import ModelError, first_line
from .zoo import ZOO


def build_model(spec: str, num_classes: int | None = None, args: tuple[str, ...] = ()) -> nn.Module:
    """Instantiate the architecture named by `spec` with random weights (nothing downloads).

    `fddaq:NAME` (the zoo), `torchvision:NAME` (any torchvision builder, `weights=None`),
    `timm:NAME` (`timm.create_model(NAME, pretrained=False)`), `package.module:callable` or
    `path/to/file.py:callable` (a factory returning an `nn.Module`; `callable` may be dotted,
    `EfficientNet.from_name`). `args` are passed to the factory: `VALUE` positionally,
    `KEY=VALUE` by keyword, each value a Python literal when it reads as one, else a string."""
    prefix, sep, name = spec.rpartition(":")
    if not sep or not prefix or not name:
        raise ModelError(
            f"architecture spec {spec!r} is not of the form 'fddaq:NAME', 'torchvision:NAME', 'timm:NAME', "
            "'package.module:callable' or 'path/to/file.py:callable'"
        )
    if num_classes is not None and num_classes < 1:
        raise ModelError(f"`num_classes` {num_classes} must be at least 1")
    positional, keywords = parse_arch_args(args)
    if num_classes is not None:
        keywords["num_classes"] = num_classes
    if prefix == "fddaq":
        if name not in ZOO:
            raise ModelError(f"unknown architecture {spec!r}; fddaq's zoo has: {', '.join(sorted(ZOO))}")
        factory = ZOO[name].factory
    elif prefix == "torchvision":
        factory = _torchvision_builder(name)
        keywords = {**_no_weights(factory), **keywords}
    elif prefix == "timm":
        factory = _timm_builder(name)
    else:
        factory = _user_factory(prefix, name, spec)
    accepted = _parameters(factory)
    if "num_classes" in keywords and "num_classes" not in accepted and "**" not in accepted:
        raise ModelError(f"{spec} does not take num_classes")
    try:
        model = factory(*positional, **keywords)
    except Exception as exc:  # the factory is the user's (or a library's) code
        given = ", ".join([*map(repr, positional), *(f"{k}={v!r}" for k, v in keywords.items())])
        raise ModelError(f"building {spec}({given}) failed: {first_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def parse_arch_args(args: tuple[str, ...]) -> tuple[list, dict]:
    """`--arch-arg` values as (positional, keyword) arguments."""
    positional, keywords = [], {}
    for text in args:
        key, sep, value = text.partition("=")
        if sep and key.isidentifier():
            keywords[key] = _literal(value)
        elif keywords:
            raise ModelError(f"`arch_arg` {text!r}: positional arguments come before KEY=VALUE ones")
        else:
            positional.append(_literal(text))
    return positional, keywords


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _torchvision_builder(name: str):
    import torchvision

    if name not in torchvision.models.list_models():
        raise ModelError(f"unknown torchvision model {name!r} (e.g. resnet18, mobilenet_v2, lraspp_mobilenet_v3_large)")
    return torchvision.models.get_model_builder(name)


def _no_weights(factory) -> dict:
    """weights=None (and weights_backbone=None where the builder has one): nothing downloads."""
    accepted = _parameters(factory)
    return {key: None for key in ("weights", "weights_backbone") if key in accepted}


def _timm_builder(name: str):
    try:
        import timm
    except ImportError as exc:
        raise ModelError(f"timm:{name} needs the timm package: pip install timm") from exc
    if not timm.is_model(name):
        raise ModelError(f"unknown timm model {name!r} (e.g. mobilenetv3_large_100, tf_efficientnet_lite0)")
    return functools.partial(timm.create_model, name, pretrained=False)


def _user_factory(prefix: str, name: str, spec: str):
    """The callable `name` (dotted) of the module `prefix`: a file path ending in .py, or a
    module imported with the current folder on the import path."""
    if prefix.endswith(".py"):
        path = Path(prefix)
        if not path.is_file():
            raise ModelError(f"architecture file {path} does not exist (spec {spec!r})")
        module_name = f"fddaq_user_{path.stem}_{abs(hash(str(path.resolve()))):x}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        with _on_import_path(str(path.resolve().parent)):
            sys.modules[module_name] = module
            try:
                loader_spec.loader.exec_module(module)
            except Exception as exc:  # the user's file
                del sys.modules[module_name]
                raise ModelError(f"cannot load {path}: {type(exc).__name__}: {first_line(exc)}") from exc
    else:
        try:
            with _on_import_path(os.getcwd()):
                module = importlib.import_module(prefix)
        except ImportError as exc:
            missing = getattr(exc, "name", None) or ""
            own = isinstance(exc, ModuleNotFoundError) and (prefix + ".").startswith(missing + ".")  # not a dependency of it
            hint = f"; for a file, give its path: {prefix.replace('.', '/')}.py:{name}" if own else ""
            raise ModelError(f"cannot import module {prefix!r} of architecture spec {spec!r}: {exc}{hint}") from exc
    factory = module
    for part in name.split("."):
        factory = getattr(factory, part, None)
    if not callable(factory):
        raise ModelError(f"module {prefix!r} has no callable {name!r} (architecture spec {spec!r})")
    return factory


@contextlib.contextmanager
def _on_import_path(folder: str):
    added = folder not in sys.path
    if added:
        sys.path.append(folder)
    try:
        yield
    finally:
        if added:
            sys.path.remove(folder)


def _parameters(factory) -> tuple[str, ...]:
    """The factory's parameter names, with "**" when it takes any keyword."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature
        return ("**",)
    return tuple("**" if p.kind is p.VAR_KEYWORD else p.name for p in parameters)


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
            "instead, or pass `trust_model` if you trust the file"
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


def load_float_model(path: Path, spec: str, num_classes: int | None = None, trust: bool = False,
                     args: tuple[str, ...] = ()) -> nn.Module:
    """The architecture `spec` (built with `args`) with the weights of state dict `path`, in eval
    mode (`trust`: see `read_state_dict`)."""
    state = read_state_dict(path, trust)
    model = build_model(spec, num_classes, args)
    load_weights(model, state, f"{path} does not fit architecture {spec}")
    for name, tensor in model.state_dict().items():
        bad = int((~torch.isfinite(tensor)).sum()) if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() else 0
        if bad:
            raise ModelError(f"{path}: {name} holds {bad} non-finite value{'s' * (bad > 1)} (NaN or inf) of "
                             f"{tensor.numel()}; such a model cannot be calibrated or quantized")
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
        hint = " (pass `num_classes`?)" if wrong and not missing and not unexpected else ""
        raise ModelError(f"{problem}: {'; '.join(parts)}{hint}")
    model.load_state_dict(state)


def input_channels(model: nn.Module) -> int:
    """Channels of the model input, from its first convolution (1 = grey, 3 = RGB): the first
    `nn.Conv2d`, else the first 4-dimensional parameter (a weight used by F.conv2d)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    for parameter in model.parameters():
        if parameter.dim() == 4:
            return parameter.shape[1]
    raise ModelError("the model has no 2-d convolution, so its input channels are unknown")
