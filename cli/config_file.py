"""`--config FILE.toml`: option values read from a file (flags given on the command line win),
and the resolved options written next to a command's outputs so the run can be repeated.

Keys are the option names without the leading dashes (`bits = 4`, `max-drop = 1.0`; `max_drop`
works too) plus the argument's name for the command's argument (`model`), at the top level or under a table named after
the command (`[quantize]`), which wins. Paths are written absolute; a relative path in a file
is read relative to that file's folder, so `--config out/config.toml` works from anywhere."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the same parser, before it joined the standard library
    import tomli as tomllib

from fddaq.errors import ConfigError

# Options that say how to run, not what to compute: never saved.
NOT_SAVED = {"config", "force", "resume", "quiet", "json_path"}
ARCH_FILE = re.compile(r"^(?P<file>.+\.py):(?P<name>[^/\\:]+)$")  # an --arch spec naming a file


def path_options(command: Any) -> set[str]:
    """The names of `command`'s options and arguments that are paths (Typer gives a `Path`
    annotation a path type), and --arch (a file spec may name a path)."""
    return {param.name for param in command.params if "Path" in type(param.type).__name__} | {"arch"}


def read_config(path: Path, command: Any) -> dict[str, Any]:
    """The default map for `command` (the Click command Typer built: its `name` and `params`)
    from the TOML file `path`; a ConfigError names any key that is not one of its options."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    keys = {key: param.name for param in command.params if param.name != "config" for key in _keys(param)}
    paths = path_options(command)
    values = {key: value for key, value in data.items() if not isinstance(value, dict)}
    section = data.get(command.name, {})
    if not isinstance(section, dict):
        raise ConfigError(f"config file {path}: [{command.name}] must be a table of options")
    values.update(section)
    defaults = {}
    for key, value in values.items():
        name = keys.get(key.replace("-", "_"))
        if name is None:
            known = ", ".join(sorted(_keys(p)[-1].replace("_", "-") for p in command.params if p.name != "config"))
            raise ConfigError(f"config file {path}: {key!r} is not an option of `fddaq {command.name}` (options: {known})")
        defaults[name] = _anchored(value, Path(path).parent) if name in paths else value
    return defaults


def _keys(param: Any) -> list[str]:
    """The keys that set `param` (underscored): its name, then its long flags without their
    dashes (`json` for --json, whose parameter is `json_path`); the last is the one to show."""
    return [param.name, *(opt[2:].replace("-", "_") for opt in param.opts if opt.startswith("--"))]


def _anchored(value: Any, folder: Path) -> Any:
    """A path value (or list of them, or a file --arch spec) relative to `folder` when relative."""
    if isinstance(value, list):
        return [_anchored(v, folder) for v in value]
    if not isinstance(value, str):
        return value
    spec = ARCH_FILE.match(value)
    if spec is not None:
        return f"{_anchored(spec['file'], folder)}:{spec['name']}"
    if ":" in value or Path(value).is_absolute():  # fddaq:NAME, timm:NAME, package.module:callable
        return value
    return str(folder / value)


def config_toml(command: str, params: dict[str, Any], paths: set[str] = frozenset()) -> str:
    """The resolved options of a run as a TOML file that `--config` reads back; the values of
    `paths` (option names: `path_options`) are written absolute."""
    lines = [f"# fddaq {command}: the options of this run; repeat it with `fddaq {command} --config THIS_FILE`", f"[{command}]"]
    for name, value in params.items():
        if name in NOT_SAVED or value is None or value == () or value == []:
            continue
        lines.append(f"{name.replace('_', '-')} = {_toml_value(_absolute(value) if name in paths else value)}")
    return "\n".join(lines) + "\n"


def _absolute(value: Any) -> Any:
    """Paths, and the file of a file --arch spec, made absolute: the saved run repeats from anywhere."""
    if isinstance(value, (list, tuple)):
        return [_absolute(v) for v in value]
    spec = ARCH_FILE.match(str(value))
    if spec is not None:
        return f"{Path(spec['file']).absolute()}:{spec['name']}" if Path(spec["file"]).is_file() else value
    if isinstance(value, str) and ":" in value:  # an --arch spec such as fddaq:NAME
        return value
    return str(Path(value).absolute())


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
