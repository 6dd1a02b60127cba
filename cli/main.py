"""The `fddaq` command line: parse options, call one core function, render, map errors."""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fddaq import __version__
from fddaq.config import ACTIVATIONS, PRESETS, SYNTH_METHODS, WEIGHT_GRIDS
from fddaq.errors import ConfigError, FddaqError
from fddaq.recipes import DEFAULT_RECIPE, RECIPES, RECONSTRUCT_ITERATIONS, SYNTH_RECIPES

from .render import ProgressRenderer, markdown, table

app = typer.Typer(
    help="Quantize CNNs to low bits with a handful of real images, export QDQ ONNX, verify it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

EXIT_GATE = 3
EXIT_INTERRUPTED = 130
SENSITIVITY_OUTPUTS = ("sensitivity.json", "sensitivity.png", "config.toml", "summary.md")
QUANTIZE_OUTPUTS = ("quantized.pt", "model.onnx", "report.json", "preview.png", "precision.png", "config.toml", "summary.md")
SYNTH_OUTPUTS = ("synthetic.pt", "preview.png", "report.json", "config.toml", "summary.md")


def flag_advice(message: str, command: str | None = None) -> str:
    """A core error's message as the CLI says it: each setting it names `like_this` becomes the
    flag that sets it (`num_classes` -> --num-classes), the flags of `command` (a command's
    function name) first."""
    commands = typer.main.get_command(app).commands.values()
    flags: dict[str, str] = {}
    for found in sorted(commands, key=lambda c: getattr(c.callback, "__name__", None) == command):  # `command` last: it wins
        flags.update((param.name, max(param.opts, key=len)) for param in found.params
                     if param.name and param.opts[0].startswith("-"))
    return re.sub(r"`([a-z][a-z0-9_]*)`", lambda match: flags.get(match.group(1), match.group(0)), message)


def _print_error(exc: FddaqError, command: str | None = None) -> None:
    err_console.print(f"Error: {flag_advice(str(exc), command)}", highlight=False, markup=False, soft_wrap=True)


def user_errors(command):
    """Run a command; a user error becomes one line on stderr and exit code 1, no traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except FddaqError as exc:
            _print_error(exc, command.__name__)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            from cli.jobs import RESUME_FILE

            out = kwargs.get("out")
            saved = command.__name__ == "quantize" and out is not None and (Path(out) / RESUME_FILE).is_file()
            err_console.print("Interrupted: no output was half-written. " + (
                "`quantize` continues from its last saved step when run again with the same options and --resume."
                if saved else "Nothing was saved to resume from yet: run the command again."))
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper


def _floats(text: str | None, name: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{name}={text!r} must be comma-separated numbers, e.g. 0.485,0.456,0.406") from None


def _version(value: bool) -> None:
    if value:
        console.print(f"fddaq {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """fddaq: FDDA post-training quantization to QDQ ONNX."""


def _source(ctx: typer.Context, calib: Path | None, val: Path | None = None):
    """What the command reads: its MODEL argument, the model options it was given (by name from
    `ctx.params`: --arch and `MODEL_OPTIONS`, None where the command has none), and the image
    folders."""
    from fddaq.pipeline import PreprocessOptions, Source

    given = {name: ctx.params.get(name) for name in ("arch", *MODEL_OPTIONS)}  # as parsed: paths are strings here
    options = PreprocessOptions(_value(given["preset"]), given["input_size"], given["resize"],
                                _floats(given["mean"], "--mean"), _floats(given["std"], "--std"))
    classes = None if given["classes"] is None else Path(given["classes"])
    return Source(Path(ctx.params["model"]), given["arch"], calib, val, given["num_classes"], classes, options,
                  bool(given["trust_model"]), tuple(given["arch_arg"] or ()), given["output"])


def _read_config(ctx: typer.Context, param: typer.CallbackParam, value: Path | None) -> Path | None:
    """Eager: the file's values become the command's defaults, so flags given still win."""
    if value is not None:
        from .config_file import read_config

        try:
            defaults = read_config(value, ctx.command)
        except FddaqError as exc:
            _print_error(exc)
            raise typer.Exit(1) from None
        ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def _choices(name: str, values) -> type[Enum]:
    """An Enum of the strings `values`: Typer lists them in --help and refuses any other."""
    return Enum(name, [(value, value) for value in values], type=str)


Recipe = _choices("Recipe", RECIPES)
SynthRecipe = _choices("SynthRecipe", SYNTH_RECIPES)
PresetName = _choices("PresetName", PRESETS)
SynthMethod = _choices("SynthMethod", SYNTH_METHODS)
WeightGrid = _choices("WeightGrid", WEIGHT_GRIDS)
Activations = _choices("Activations", ACTIVATIONS)

# Options several commands share (Typer copies each for every command that uses it).
ModelFile = Annotated[Path, typer.Argument(help="Float state dict (.pth), loaded with weights_only=True.")]
Arch = Annotated[str, typer.Option("--arch", help="Architecture: fddaq:NAME, torchvision:NAME, timm:NAME, "
                                   "package.module:callable or path/to/file.py:callable (nothing is downloaded).")]
ArchArg = Annotated[list[str] | None, typer.Option(
    "--arch-arg", help="Argument of the architecture factory, repeatable: VALUE (positional) or KEY=VALUE; Python "
    "literals are parsed, e.g. --arch-arg efficientnet-b0.")]
ScoredOutput = Annotated[str | None, typer.Option(
    "--output", help="For models returning several tensors: the output scored and distilled, by name (out, aux, output.1) "
    "or index (default: the only one, else out, else the first).")]
Calib = Annotated[Path, typer.Option("--calib", help="Calibration images: DIR/<class>/<image> (or a flat folder).")]
NumClasses = Annotated[int | None, typer.Option("--num-classes", help="Passed to the architecture factory.")]
Classes = Annotated[Path | None, typer.Option(
    "--classes", help="File of class folder names, one per line (line i = class i).")]
Preset = Annotated[PresetName | None, typer.Option("--preset", help="Preprocessing preset.")]
InputSize = Annotated[int | None, typer.Option("--input-size", help="Centre-crop size in pixels.")]
Resize = Annotated[int | None, typer.Option("--resize", help="Resize the shorter side to this before cropping.")]
Mean = Annotated[str | None, typer.Option("--mean", help="Per-channel mean, e.g. 0.485,0.456,0.406.")]
Std = Annotated[str | None, typer.Option("--std", help="Per-channel std, e.g. 0.229,0.224,0.225.")]
TrustModel = Annotated[bool, typer.Option(
    "--trust-model", help="Accept a pickled whole model (torch.save(model)): unpickling runs code from the file, so "
    "only for files you trust.")]
Device = Annotated[str, typer.Option(
    "--device", help="Where PyTorch runs: auto (a CUDA GPU when there is one), cpu, cuda or cuda:INDEX.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed.")]
Force = Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output; the table is still printed.")]
ConfigFile = Annotated[Path | None, typer.Option(
    "--config", callback=_read_config, is_eager=True,
    help="TOML file of option values (keys: option names, e.g. bits = 4); flags given win.")]
# the bits of the layers (quantize, plan, sensitivity: `_quant_config`)
Bits = Annotated[int, typer.Option("--bits", help="Weight and activation bits of every layer, first and last included.")]
WeightBits = Annotated[int | None, typer.Option("--weight-bits", help="Weight bits (default: --bits).")]
ActBits = Annotated[int | None, typer.Option("--act-bits", help="Activation bits (default: --bits).")]
FirstLastBits = Annotated[int | None, typer.Option(
    "--first-last-bits", help="Bits of the first and last layer (default: as the others).")]
LayerBits = Annotated[list[str] | None, typer.Option(
    "--layer-bits", help="Per-layer override PATTERN=BITS, PATTERN=W/A or PATTERN=float (repeatable; shell patterns, "
    "e.g. --layer-bits 'fc=8' --layer-bits 'stages.*.shortcut.*=float'). A pattern matching no layer is an error.")]
WeightGridOption = Annotated[WeightGrid, typer.Option(
    "--weight-grid", help="auto: weights of 4 bits and fewer on an affine grid (16 levels, a zero point per channel), "
    "wider ones symmetric; symmetric: zero point 0 at every width (for hardware whose low-bit kernels take none).")]
ActivationsOption = Annotated[Activations, typer.Option(
    "--activations", help="all: every tensor between operators is quantized (conv outputs, adds, concats, pooling: the "
    "graph integer runtimes and accelerators chain integer kernels on); inputs: only the inputs of conv and linear "
    "layers; auto: all at 8-bit activations, inputs below.")]
# a budget for the bit search (quantize, plan: `_budget`)
TargetSize = Annotated[float | None, typer.Option(
    "--target-size", help="Choose each layer's weight bits (--bit-choices) for the most accurate model whose ONNX file "
    "is at most this ratio of the float ONNX (e.g. 0.2); exit 3 if the file misses it.")]
TargetDrop = Annotated[float | None, typer.Option(
    "--target-drop", help="Choose each layer's weight bits (--bit-choices) for the smallest model that loses at most "
    "this many points of top-1 agreement with float on calibration images held out of calibration (never --val); "
    "exit 3 if no plan does.")]
BitChoices = Annotated[str, typer.Option(
    "--bit-choices", help="Weight widths the budget search chooses from. Activations stay at --act-bits (default: the "
    "widest choice).")]
# Groups of options a command takes with `with_options`: name -> (its annotated type, its default).
MODEL_OPTIONS = {
    "num_classes": (NumClasses, None), "classes": (Classes, None), "preset": (Preset, None),
    "input_size": (InputSize, None), "resize": (Resize, None), "mean": (Mean, None), "std": (Std, None),
    "trust_model": (TrustModel, False), "arch_arg": (ArchArg, None), "output": (ScoredOutput, None),
}
BITS_OPTIONS = {
    "bits": (Bits, 4), "weight_bits": (WeightBits, None), "act_bits": (ActBits, None),
    "first_last_bits": (FirstLastBits, None), "layer_bits": (LayerBits, None),
    "weight_grid": (WeightGridOption, "auto"), "activations": (ActivationsOption, "auto"),
}
BUDGET_OPTIONS = {"target_size": (TargetSize, None), "target_drop": (TargetDrop, None), "bit_choices": (BitChoices, "4,8")}
# every command's: --force (read by `_check_outputs` and `_check_file`), --config (its callback `_read_config`)
FILE_OPTIONS = {"force": (Force, False), "config": (ConfigFile, None)}


def with_options(*groups: dict) -> Callable:
    """A command that also takes the options of `groups` (after its own), and reads them from
    `ctx.params` (`_source`, `_quant_config`, `_budget`, `_check_outputs`, `_check_file`): they
    are declared once, here, for every command that takes them."""
    def decorate(command: Callable) -> Callable:
        added = {name: option for group in groups for name, option in group.items()}

        @functools.wraps(command)
        def run(*args, **kwargs):
            return command(*args, **{name: value for name, value in kwargs.items() if name not in added})

        signature = inspect.signature(command, eval_str=True)  # annotations as objects: Annotated kept
        extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)
                 for name, (annotation, default) in added.items()]
        run.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *extra])
        return run

    return decorate


SYNTH_METHOD_HELP = ("How FDDA's losses make synthetic images: pool (optimise a pool of images started from augmented "
                     "calibration images) or generator (train the paper's conditional generator). Default: the recipe's.")


def _save_config(ctx: typer.Context, out: Path, **chosen) -> None:
    """The resolved options, for `--config` to repeat the run; `chosen`: options to write
    instead (a bit search's plan as --layer-bits, without its budget)."""
    from fddaq.io import atomic_write_bytes

    from .config_file import config_toml, path_options

    params = {**ctx.params, **chosen}
    atomic_write_bytes(out / "config.toml", config_toml(ctx.command.name, params, path_options(ctx.command)).encode())


def _show(title: str, report: dict, out: Path | None = None) -> None:
    """Print the command's table; write its Markdown summary to out/summary.md (when `out`)
    and append it to the GitHub Actions job summary (when GITHUB_STEP_SUMMARY is set)."""
    console.print(table(title, report["table"]))
    summary = markdown(title, report["table"], report.get("layers"))
    if out is not None:
        from fddaq.io import atomic_write_bytes

        atomic_write_bytes(out / "summary.md", summary.encode())
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if step_summary:
        try:
            with open(step_summary, "a", encoding="utf-8") as handle:
                handle.write(summary + "\n")
        except OSError as exc:  # the run itself succeeded: say so, do not fail it
            err_console.print(f"Warning: cannot append to GITHUB_STEP_SUMMARY ({step_summary}): {exc}")


def _check_writable(folder: Path, what: str) -> None:
    """Before any work: `folder` is, or can be created as, a folder this process can write in
    (a file in the way, or a read-only place, would otherwise fail after the expensive stages)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what} {folder}: {existing} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as exc:
        raise ConfigError(f"{what} {folder}: cannot write in {existing} ({exc.strerror or exc})") from None


def _check_file(ctx: typer.Context, path: Path | None) -> None:
    """Before any work: `path` (when given) can be written (it exists: only with --force)."""
    if path is None:
        return
    if path.is_dir():
        raise ConfigError(f"{path} is a folder: give a file name")
    if path.exists() and not ctx.params["force"]:
        raise ConfigError(f"{path} exists: pass --force to overwrite it")
    _check_writable(path.parent, "cannot write the file into")


def _check_outputs(ctx: typer.Context, out: Path, names: tuple[str, ...]) -> None:
    """Before any work: the outputs `names` can be written in `out` (existing ones: only with --force)."""
    _check_writable(out, "--out")
    folders = [name for name in names if (out / name).is_dir()]
    if folders:
        raise ConfigError(f"{out} holds folders named {', '.join(folders)}, where the outputs go: choose another --out")
    existing = [name for name in names if (out / name).exists()]
    if existing and not ctx.params["force"]:
        raise ConfigError(f"{out} already holds {', '.join(existing)}: pass --force to overwrite or choose another --out")


def _value(choice: Enum | str | None) -> str | None:
    """A choice's string: Typer hands the command an Enum member, and keeps the string in `ctx.params`."""
    return None if choice is None else getattr(choice, "value", choice)


def _budget(params: dict):
    """The budget of --target-size / --target-drop (from a command's `params`), None without one."""
    if params["target_size"] is None and params["target_drop"] is None:
        return None
    from fddaq.config import BudgetConfig, parse_bit_choices

    return BudgetConfig(params["target_size"], params["target_drop"], parse_bit_choices(params["bit_choices"]))


def _quant_config(params: dict, budget=None):
    """The bits options of a command's `params` as a QuantConfig; with a `budget`, activations
    default to its widest choice (their bits do not change the size)."""
    from fddaq.config import QuantConfig

    bits = params["bits"]
    act_bits = params["act_bits"] or (max(budget.bit_choices) if budget is not None else bits)
    return QuantConfig(params["weight_bits"] or bits, act_bits, params["first_last_bits"],
                       layers=tuple(params["layer_bits"] or ()), weight_grid=_value(params["weight_grid"]),
                       activations=_value(params["activations"]))


def _resolve_device(spec: str):
    from fddaq.device import resolve_device

    return resolve_device(spec)


LOCK_FILE = ".fddaq.lock"


@contextlib.contextmanager
def _locked(out: Path, owner: bool = True):
    """One writer per --out: the run holds an exclusive `flock` on `out/.fddaq.lock` (which
    names its process) while it runs, and a second run on the folder is refused. The kernel
    drops the lock when its process ends, however it ends. Folders this creates and leaves
    empty are removed again. `owner`: this process writes (rank 0 of a torchrun job)."""
    if not owner:
        yield
        return
    created = [folder for folder in (out, *out.parents) if not folder.exists()]
    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK_FILE
    try:
        fd = _acquire(lock, out)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)
        _remove_empty(created)


def _acquire(lock: Path, out: Path) -> int:
    """An open descriptor of `lock` holding its exclusive lock, with this process's id in it."""
    import fcntl

    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as exc:
            raise ConfigError(f"cannot lock {out} for this run: {lock} ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(f"{out} is being written by another fddaq run (process {holder}): wait for it to end, "
                              "or choose another --out") from None
        try:
            current = os.stat(lock).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:  # not a file its last holder removed meanwhile
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            return fd
        os.close(fd)


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders of `folders` (deepest first) that are empty."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def _job(device: str, out: Path):
    """(device, ranks): the torchrun job this process belongs to (a job of one without
    torchrun) on the resolved `device`, with `out` locked by its main process; left at the
    end."""
    from fddaq.distributed import join, leave

    where = _resolve_device(device)
    try:
        ranks = join(where)
        with _locked(out, ranks.is_main):
            yield where, ranks
    finally:
        leave()


@app.command()
@user_errors
@with_options(MODEL_OPTIONS, BITS_OPTIONS, BUDGET_OPTIONS, FILE_OPTIONS)
def quantize(
    ctx: typer.Context,
    model: ModelFile,
    arch: Arch,
    calib: Calib,
    val: Annotated[Path | None, typer.Option("--val", help="Labelled validation images, same layout; used only to report.")] = None,
    recipe: Annotated[Recipe, typer.Option("--recipe", help="reconstruct (default: block-wise reconstruction, AdaRound + LSQ + QDrop, unit by unit), fddaq (end-to-end fine-tuning on real and FDDA images), fdda-paper (the official recipe), ptq (calibration only) or data-free (synthetic images only; --calib then only measures the result).")] = DEFAULT_RECIPE,
    steps: Annotated[int | None, typer.Option("--steps", help=f"Training steps: reconstruction iterations per unit (reconstruct: {RECONSTRUCT_ITERATIONS}) or fine-tuning steps (the others: 400); 0: calibration only.")] = None,
    synthetic: Annotated[int | None, typer.Option("--synthetic", help="FDDA synthetic images added to the training images (reconstruct: up to 512 join its pool; fddaq, fdda-paper: mixed 1:1 into fine-tuning); 0: real images only. Default: fdda-paper 1024; reconstruct and fddaq choose from the calibration images (report.json synthesis_choice says why).")] = None,
    synth_steps: Annotated[int | None, typer.Option("--synth-steps", help="FDDA synthesis steps (default 500).")] = None,
    synth_method: Annotated[SynthMethod | None, typer.Option("--synth-method", help=SYNTH_METHOD_HELP)] = None,
    synthetic_from: Annotated[Path | None, typer.Option(
        "--synthetic-from", help="Use the images of a synthetic.pt written by `fddaq synth` instead of synthesizing "
        "(all of them; any recipe that trains).")] = None,
    seed: Seed = 0,
    max_drop: Annotated[float | None, typer.Option("--max-drop", help="Fail with exit 3 if ONNX top-1 on --val is more than this many points below float.")] = None,
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("out"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in --out (same options).")] = False,
    device: Device = "auto",
    quiet: Quiet = False,
) -> None:
    """Quantize a float model: calibrate on real images, reconstruct it block by block against
    the float model (the default recipe; others fine-tune it by distillation on real and FDDA
    synthetic images), export a QDQ ONNX graph and verify it in onnxruntime. Writes
    quantized.pt, model.onnx, report.json, config.toml (these options, for --config),
    summary.md and, when images were synthesized, preview.png.

    Example: fddaq quantize examples/fashion_mnist/model.pth --arch fddaq:fashion_resnet --calib examples/fashion_mnist/calib --val examples/fashion_mnist/val --bits 4 --out out/
    """
    from cli.jobs import run_quantize
    from fddaq.recipes import recipe_config

    _check_outputs(ctx, out, QUANTIZE_OUTPUTS)
    if max_drop is not None and val is None:
        raise ConfigError("--max-drop needs --val: the gate compares accuracy on labelled validation images")
    budget = _budget(ctx.params)
    quant = _quant_config(ctx.params, budget)
    run_config = replace(recipe_config(_value(recipe), quant, seed, steps, synthetic, synth_steps, _value(synth_method)),
                         budget=budget)
    if synthetic_from is not None and run_config.finetune.steps == 0 and run_config.reconstruct.iterations == 0 \
            and run_config.real_images:
        raise ConfigError(f"--recipe {_value(recipe)} with --steps 0 does not train: the images of --synthetic-from would "
                          "go unused")
    source = _source(ctx, calib, val)
    with _job(device, out) as (where, ranks):
        with ProgressRenderer(console, quiet or not ranks.is_main) as progress:
            report = run_quantize(source, run_config, out, progress, resume, where, synthetic_from, max_drop)
        if report is None:  # another rank than 0 of a torchrun job: rank 0 reports
            return
        searched = report["precision"]
        if searched is None:
            _save_config(ctx, out)
            setting = f"W{quant.weight_bits}A{quant.act_bits}"
        else:  # the plan chosen, so that --config repeats it without searching
            _save_config(ctx, out, layer_bits=[*(ctx.params["layer_bits"] or ()), *searched["overrides"]], target_size=None,
                         target_drop=None, act_bits=quant.act_bits)
            setting = f"weights {'/'.join(map(str, searched['budget']['bit_choices']))}, A{quant.act_bits}"
        _show(f"fddaq quantize: {model.name} at {setting}, recipe {_value(recipe)}", report, out)
    written = [name for name in QUANTIZE_OUTPUTS if (name != "preview.png" or report["synthesis"] is not None)
               and (name != "precision.png" or report["precision"] is not None)]
    console.print(f"wrote {', '.join(str(out / name) for name in written)}")
    gate = report["gate"]
    if gate["passed"] is False:
        err_console.print(f"Quality gate failed: ONNX top-1 is {gate['drop']:.2f} points below float (--max-drop {max_drop})")
        raise typer.Exit(EXIT_GATE)
    if report["precision"] is not None and not report["precision"]["met"]:
        err_console.print(f"Budget missed: {report['precision']['verdict']}")
        raise typer.Exit(EXIT_GATE)


@app.command()
@user_errors
@with_options(MODEL_OPTIONS, FILE_OPTIONS)
def synth(
    ctx: typer.Context,
    model: ModelFile,
    arch: Arch,
    calib: Annotated[Path | None, typer.Option(
        "--calib", help="Calibration images: DIR/<class>/<image> (or a flat folder); not needed with --recipe data-free.")] = None,
    recipe: Annotated[SynthRecipe, typer.Option(
        "--recipe", help="Whose synthesis settings: fddaq (a pool of images started from the calibration images), "
        "fdda-paper (the paper's generator) or data-free (the generator on the BN running statistics alone, without "
        "--calib; given --calib only measures the images).")] = "fddaq",
    num: Annotated[int, typer.Option("--num", help="Synthetic images to write.")] = 1024,
    steps: Annotated[int | None, typer.Option("--steps", help="Synthesis steps (default 500).")] = None,
    method: Annotated[SynthMethod | None, typer.Option("--method", help=SYNTH_METHOD_HELP)] = None,
    val: Annotated[Path | None, typer.Option(
        "--val", help="Held-out labelled real images: the reference for the quality figures.")] = None,
    seed: Seed = 0,
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("synth"),
    device: Device = "auto",
    quiet: Quiet = False,
) -> None:
    """Make labelled synthetic images with FDDA's losses on the calibration images' BatchNorm
    statistics (a pool of images optimised from augmented calibration images, or the paper's
    conditional generator: --method) and write them (synthetic.pt), a preview grid and a report.

    Example: fddaq synth examples/fashion_mnist/model.pth --arch fddaq:fashion_resnet --calib examples/fashion_mnist/calib --num 1024 --out synth/
    """
    from cli.jobs import run_synth
    from fddaq.config import QuantConfig
    from fddaq.recipes import recipe_config

    _check_outputs(ctx, out, SYNTH_OUTPUTS)
    if num < 1:
        raise ConfigError(f"--num={num} must be at least 1")
    run_config = recipe_config(_value(recipe), QuantConfig(), seed, synthetic=num, synth_steps=steps,
                               synth_method=_value(method))
    if calib is None and run_config.real_images:
        raise ConfigError(f"--recipe {_value(recipe)} synthesizes from calibration images: give --calib DIR (only --recipe "
                          "data-free runs without)")
    source = _source(ctx, calib, val)
    with _job(device, out) as (where, ranks):
        with ProgressRenderer(console, quiet or not ranks.is_main) as progress:
            report = run_synth(source, run_config.synth, out, progress, where, run_config.real_images)
        if report is None:
            return
        _save_config(ctx, out)
        _show(f"fddaq synth: {model.name}", report, out)
    console.print(f"wrote {out / 'synthetic.pt'}, {out / 'preview.png'}, {out / 'report.json'}, "
                  f"{out / 'config.toml'}, {out / 'summary.md'}")


@app.command()
@user_errors
@with_options(FILE_OPTIONS)
def export(
    ctx: typer.Context,
    checkpoint: Annotated[Path, typer.Argument(help="quantized.pt written by `fddaq quantize`.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="ONNX file to write.")] = Path("model.onnx"),
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset (21 or newer: INT4 types).")] = 21,
    int8_weights: Annotated[bool, typer.Option(
        "--int8-weights",
        help="Store weights of 4 bits and fewer as INT8 (the same values; about twice the weight bytes): onnxruntime "
             "then runs symmetric-grid (--weight-grid symmetric) W4A8 convolutions on its 8-bit integer kernels.")] = False,
) -> None:
    """Re-export the QDQ ONNX graph from a checkpoint alone.

    Example: fddaq export out/quantized.pt -o model.onnx
    """
    from exporters.deploy import export_checkpoint
    from fddaq.checkpoint import load_checkpoint
    from fddaq.io import atomic_write_bytes

    _check_file(ctx, output)
    start = time.perf_counter()
    data = export_checkpoint(load_checkpoint(checkpoint), opset, int8_weights)
    atomic_write_bytes(output, data)
    console.print(f"wrote {output} ({len(data) / 1024:.1f} KiB) in {time.perf_counter() - start:.1f}s")


@app.command()
@user_errors
@with_options(FILE_OPTIONS)
def verify(
    ctx: typer.Context,
    onnx_file: Annotated[Path, typer.Argument(help="QDQ ONNX file written by `fddaq quantize` or `fddaq export`.")],
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="quantized.pt the file was exported from.")],
    data: Annotated[Path, typer.Option("--data", help="Images: DIR/<class>/<image> (accuracies too) or a flat folder.")],
    min_agreement: Annotated[float, typer.Option(
        "--min-agreement", help="Exit 3 when a top-1 agreement (optimizations off or on) is below this percentage.")] = 99.0,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the report as JSON to this file.")] = None,
    quiet: Quiet = False,
) -> None:
    """Check that onnxruntime (CPU, graph optimizations off and on) reproduces the checkpoint's
    fake-quant model: top-1 agreement, logit and activation differences in quantization steps,
    accuracies, and which kernels the optimized graph runs.

    Example: fddaq verify out/model.onnx --checkpoint out/quantized.pt --data ./val
    """
    from fddaq.io import atomic_write_json

    from .jobs import run_verify

    _check_file(ctx, json_path)
    with ProgressRenderer(console, quiet) as progress:
        report = run_verify(onnx_file, checkpoint, data, min_agreement, progress)
    _show(f"fddaq verify: {onnx_file.name}", report)
    if json_path is not None:
        atomic_write_json(json_path, report)
    if not report["gate"]["passed"]:
        err_console.print(f"Verification failed: {'; '.join(report['gate']['failures'])}.")
        raise typer.Exit(EXIT_GATE)


@app.command()
@user_errors
@with_options(MODEL_OPTIONS, BITS_OPTIONS, BUDGET_OPTIONS, FILE_OPTIONS)
def plan(
    ctx: typer.Context,
    model: ModelFile,
    arch: Arch,
    data: Annotated[Path | None, typer.Option(
        "--data", help="Calibration images (DIR/<class>/<image> or a flat folder) for --target-size / --target-drop: "
        "the plan is searched on them.")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the plan as JSON to this file.")] = None,
    quiet: Quiet = False,
) -> None:
    """Show which layers `quantize` would quantize, at which bits and why, after checking that the
    model and its quantized form export (a dry run of the export in onnxruntime): what would
    fail at the end of `quantize` fails here, in seconds. No images are needed, except with a
    budget (--target-size / --target-drop): then the bit search of `quantize` runs on the images
    of --data (as --calib; real images only, seed 0: the plan `quantize` chooses when it
    synthesizes no image and keeps the default seed) and the plan shown is the one it chooses;
    exit 3 if no plan meets the budget.

    Example: fddaq plan examples/fashion_mnist/model.pth --arch fddaq:fashion_resnet --bits 4 --layer-bits 'fc=8'
    """
    from exporters.dry_run import dry_run
    from fddaq.io import atomic_write_json
    from fddaq.pipeline import load_float, load_inputs, plan_layers, search_plan
    from fddaq.quant.plan import tensor_sites

    from .jobs import precision_report, searched_reason

    _check_file(ctx, json_path)
    budget = _budget(ctx.params)
    if budget is not None and data is None:
        raise ConfigError("--target-size and --target-drop need --data: the bit search measures plans on images")
    if budget is None and data is not None:
        raise ConfigError("--data is for the bit search: give --target-size or --target-drop too")
    quant = _quant_config(ctx.params, budget)
    source = _source(ctx, data)
    loaded = load_float(source)
    layers = plan_layers(loaded, quant)
    checked = dry_run(loaded.model, loaded.capture, layers, loaded.output)  # before a search: fails in seconds
    searched = None
    if budget is not None:
        with ProgressRenderer(console, quiet) as progress:
            precision = search_plan(load_inputs(source, loaded=loaded), quant, budget, on_event=progress)
        searched = precision_report(precision, None, quant.act_bits)
        quant = replace(quant, layers=quant.layers + precision.overrides)
        layers = plan_layers(loaded, quant)
        checked = dry_run(loaded.model, loaded.capture, layers, loaded.output)  # the chosen widths export too
    kinds = {layer.name: layer for layer in loaded.capture.layers}
    out = Table(title=f"fddaq plan: {model.name} ({arch})", title_justify="left")
    out.add_column("layer", no_wrap=True)
    for column in ("kind", "module", "weight bits", "weight grid", "input bits", "why"):
        out.add_column(column)
    for entry in layers.layers:
        module = kinds[entry.name].module_type if entry.name in kinds else "-"
        out.add_row(entry.name, entry.kind, module, str(entry.weight_bits or "-"), entry.weight_grid or "-",
                    str(entry.act_bits or "-"), searched_reason(searched, entry.name) or entry.reason)
    # piped, each row on one line and nothing cut (rich would wrap and cut the "why" column at 80 columns)
    (console if console.is_terminal else Console(file=console.file, width=10_000)).print(out)
    kept = len(layers.layers) - len(layers.quantized)
    outputs = ", ".join(f"{o.name} {list(o.shape)}" for o in loaded.capture.outputs)
    console.print(f"{len(layers.quantized)} layers quantized, {kept} kept float; outputs: {outputs} "
                  f"(scored: {loaded.output}); export dry run passed in {checked.seconds:.1f}s")
    tensors, tied = tensor_sites(loaded.capture, layers)
    console.print(f"activations: every tensor between operators, {len(tensors)} tensors quantized ({len(tied)} layers read "
                  "one as it is)" if layers.tensor_bits is not None else "activations: the inputs of the layers")
    console.print(f"preprocessing: {loaded.preprocess.describe()}")
    if searched is not None:
        console.print(f"bit search: {searched['verdict']}", highlight=False)
    if json_path is not None:
        atomic_write_json(json_path, {"model": str(model), "arch": arch, "plan": layers.to_json(), "tensors": tensors,
                                      "outputs": [o.name for o in loaded.capture.outputs], "scored_output": loaded.output,
                                      "precision": searched})
    if searched is not None and not searched["met"]:
        err_console.print(f"Budget missed: {searched['verdict']}")
        raise typer.Exit(EXIT_GATE)


@app.command()
@user_errors
@with_options(MODEL_OPTIONS, BITS_OPTIONS, FILE_OPTIONS)
def sensitivity(
    ctx: typer.Context,
    model: ModelFile,
    arch: Arch,
    calib: Calib,
    synthetic: Annotated[int, typer.Option(
        "--synthetic", help="Also measure on this many FDDA synthetic images (synthesized first, as a pool).")] = 0,
    synth_steps: Annotated[int, typer.Option("--synth-steps", help="Synthesis steps, with --synthetic.")] = 500,
    seed: Seed = 0,
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("sensitivity"),
    device: Device = "auto",
    quiet: Quiet = False,
) -> None:
    """Show where the model breaks at low bits: each quantizer (each layer's weights, each
    quantized input) ranked by the KL divergence of the output from float when it alone is at
    its bits, plus the whole model with only weights or only activations at their bits (the
    others at 8). Writes sensitivity.json, sensitivity.png (bar chart), config.toml, summary.md.

    Example: fddaq sensitivity examples/fashion_mnist/mobilenet.pth --arch fddaq:fashion_mobilenet --calib examples/fashion_mnist/calib --bits 4
    """
    from cli.jobs import run_sensitivity
    from fddaq.config import SynthConfig

    _check_outputs(ctx, out, SENSITIVITY_OUTPUTS)
    quant = _quant_config(ctx.params)
    synth_config = SynthConfig(steps=synth_steps, num_images=synthetic, seed=seed)
    source = _source(ctx, calib)
    with _locked(out):
        with ProgressRenderer(console, quiet) as progress:
            report = run_sensitivity(source, quant, out, synth_config, progress, _resolve_device(device))
        _save_config(ctx, out)
        _show(f"fddaq sensitivity: {model.name} at W{quant.weight_bits}A{quant.act_bits} (most sensitive first)", report, out)
    console.print(f"wrote {out / 'sensitivity.json'}, {out / 'sensitivity.png'}, {out / 'config.toml'}, {out / 'summary.md'}")


@app.command(name="eval")
@user_errors
@with_options(MODEL_OPTIONS, FILE_OPTIONS)
def evaluate(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(
        help="A float state dict (with --arch), a quantized.pt checkpoint or an ONNX file.")],
    data: Annotated[Path, typer.Option("--data", help="Labelled images: DIR/<class>/<image>.")],
    arch: Annotated[str | None, typer.Option(
        "--arch", help="Architecture of a float state dict (not needed for a checkpoint or ONNX file).")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the result as JSON to this file.")] = None,
    device: Device = "auto",
    quiet: Quiet = False,
) -> None:
    """Top-1 and top-5 accuracy of a float model, a quantized checkpoint (PyTorch fake-quant) or
    an ONNX file (onnxruntime, preprocessing and classes from its metadata) on labelled images.

    Example: fddaq eval out/model.onnx --data examples/fashion_mnist/val
    """
    from fddaq.io import atomic_write_json

    from .jobs import run_eval

    if arch is not None and model.suffix == ".onnx":
        raise ConfigError("--arch is for a float state dict: an ONNX file carries its own graph")
    if arch is None and any(ctx.params[name] not in (None, ()) for name in MODEL_OPTIONS
                            if name != "trust_model"):
        raise ConfigError("preprocessing and class options are for a float state dict (with --arch): "
                          "a checkpoint or ONNX file carries its own")
    source = _source(ctx, data) if arch is not None else None
    _check_file(ctx, json_path)
    where = _resolve_device(device)
    with ProgressRenderer(console, quiet) as progress:
        report = run_eval(model, data, source, progress, where)
    _show(f"fddaq eval: {model.name} ({report['kind']})", report)
    if json_path is not None:
        atomic_write_json(json_path, report)


def main() -> None:
    signal.signal(signal.SIGTERM, _interrupt)  # a kill stops like Ctrl-C
    app()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
