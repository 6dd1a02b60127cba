"""The `fddaq` command line: parse options, call one core function, render, map errors."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from fddaq import __version__
from fddaq.errors import ConfigError, FddaqError
from fddaq.recipes import DEFAULT_RECIPE, RECONSTRUCT_ITERATIONS

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


def user_errors(command):
    """Run a command; a user error becomes one line on stderr and exit code 1, no traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except FddaqError as exc:
            err_console.print(f"Error: {exc}", highlight=False, markup=False, soft_wrap=True)
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


def _floats(text: Optional[str], name: str) -> Optional[tuple[float, ...]]:
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


def _source(model, arch, calib, val, num_classes, classes, preset, input_size, resize, mean, std, trust_model,
            arch_args=None, output=None):
    from fddaq.pipeline import PreprocessOptions, Source

    options = PreprocessOptions(preset, input_size, resize, _floats(mean, "--mean"), _floats(std, "--std"))
    return Source(model, arch, calib, val, num_classes, classes, options, trust_model, tuple(arch_args or ()), output)


def _read_config(ctx: typer.Context, param: typer.CallbackParam, value: Optional[Path]) -> Optional[Path]:
    """Eager: the file's values become the command's defaults, so flags given still win."""
    if value is not None:
        from .config_file import read_config

        try:
            defaults = read_config(value, ctx.command)
        except FddaqError as exc:
            err_console.print(f"Error: {exc}", highlight=False, markup=False, soft_wrap=True)
            raise typer.Exit(1) from None
        ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def _config_option():
    return typer.Option(
        None, "--config", callback=_read_config, is_eager=True,
        help="TOML file of option values (keys: option names, e.g. bits = 4); flags given win.",
    )


def _save_config(ctx: typer.Context, out: Path, **chosen) -> None:
    """The resolved options, for `--config` to repeat the run; `chosen`: options to write
    instead (a bit search's plan as --layer-bits, without its budget)."""
    from fddaq.io import atomic_write_bytes

    from .config_file import config_toml, path_options

    params = {**ctx.params, **chosen}
    atomic_write_bytes(out / "config.toml", config_toml(ctx.command.name, params, path_options(ctx.command)).encode())


def _show(title: str, report: dict, out: Optional[Path] = None) -> None:
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


def _check_file(path: Optional[Path], force: bool) -> None:
    if path is None:
        return
    if path.is_dir():
        raise ConfigError(f"{path} is a folder: give a file name")
    if path.exists() and not force:
        raise ConfigError(f"{path} exists: pass --force to overwrite it")
    _check_writable(path.parent, "cannot write the file into")


def _check_outputs(out: Path, names: tuple[str, ...], force: bool) -> None:
    _check_writable(out, "--out")
    folders = [name for name in names if (out / name).is_dir()]
    if folders:
        raise ConfigError(f"{out} holds folders named {', '.join(folders)}, where the outputs go: choose another --out")
    existing = [name for name in names if (out / name).exists()]
    if existing and not force:
        raise ConfigError(f"{out} already holds {', '.join(existing)}: pass --force to overwrite or choose another --out")


# Options shared by the commands that read a float model and images (a fresh object per use).
def _model_option():
    return typer.Argument(..., help="Float state dict (.pth), loaded with weights_only=True.")


def _arch_option():
    return typer.Option(..., "--arch", help="Architecture: fddaq:NAME, torchvision:NAME, timm:NAME, package.module:callable "
                                            "or path/to/file.py:callable (nothing is downloaded).")


def _arch_arg_option():
    return typer.Option(None, "--arch-arg", help="Argument of the architecture factory, repeatable: VALUE (positional) or "
                                                 "KEY=VALUE; Python literals are parsed, e.g. --arch-arg efficientnet-b0.")


def _output_option():
    return typer.Option(None, "--output", help="For models returning several tensors: the output scored and distilled, "
                                               "by name (out, aux, 0.1) or index (default: the only one, else out, else the first).")


def _calib_option():
    return typer.Option(..., "--calib", help="Calibration images: DIR/<class>/<image> (or a flat folder).")


def _num_classes_option():
    return typer.Option(None, "--num-classes", help="Passed to the architecture factory.")


def _classes_option():
    return typer.Option(None, "--classes", help="File of class folder names, one per line (line i = class i).")


def _preset_option():
    return typer.Option(None, "--preset", help="Preprocessing preset: fashion-mnist, imagenet, efficientnet-lite.")


def _input_size_option():
    return typer.Option(None, "--input-size", help="Centre-crop size in pixels.")


def _resize_option():
    return typer.Option(None, "--resize", help="Resize the shorter side to this before cropping.")


def _mean_option():
    return typer.Option(None, "--mean", help="Per-channel mean, e.g. 0.485,0.456,0.406.")


def _std_option():
    return typer.Option(None, "--std", help="Per-channel std, e.g. 0.229,0.224,0.225.")


def _bits_options():
    """--bits, --weight-bits, --act-bits, --first-last-bits, --layer-bits, --weight-grid, --activations
    (quantize, plan, sensitivity)."""
    return {
        "bits": typer.Option(4, "--bits", help="Weight and activation bits of every layer, first and last included."),
        "weight_bits": typer.Option(None, "--weight-bits", help="Weight bits (default: --bits)."),
        "act_bits": typer.Option(None, "--act-bits", help="Activation bits (default: --bits)."),
        "first_last_bits": typer.Option(None, "--first-last-bits", help="Bits of the first and last layer (default: as the others)."),
        "layer_bits": typer.Option(
            None, "--layer-bits",
            help="Per-layer override PATTERN=BITS, PATTERN=W/A or PATTERN=float (repeatable; shell patterns, "
                 "e.g. --layer-bits 'fc=8' --layer-bits 'stages.*.shortcut.*=float'). A pattern matching no layer is an error.",
        ),
        "weight_grid": typer.Option(
            "auto", "--weight-grid",
            help="auto: weights of 4 bits and fewer on an affine grid (16 levels, a zero point per channel), wider ones "
                 "symmetric; symmetric: zero point 0 at every width (for hardware whose low-bit kernels take none).",
        ),
        "activations": typer.Option(
            "auto", "--activations",
            help="all: every tensor between operators is quantized (conv outputs, adds, concats, pooling: the graph "
                 "integer runtimes and accelerators chain integer kernels on); inputs: only the inputs of conv and linear "
                 "layers; auto: all at 8-bit activations, inputs below.",
        ),
    }


def _budget_options():
    """--target-size, --target-drop, --bit-choices (quantize, plan)."""
    return {
        "target_size": typer.Option(
            None, "--target-size", help="Choose each layer's weight bits (--bit-choices) for the most accurate model whose "
            "ONNX file is at most this ratio of the float ONNX (e.g. 0.2); exit 3 if the file misses it."),
        "target_drop": typer.Option(
            None, "--target-drop", help="Choose each layer's weight bits (--bit-choices) for the smallest model that loses "
            "at most this many points of top-1 agreement with float on calibration images held out of calibration "
            "(never --val); exit 3 if no plan does."),
        "bit_choices": typer.Option("4,8", "--bit-choices", help="Weight widths the budget search chooses from. "
                                    "Activations stay at --act-bits (default: the widest choice)."),
    }


def _budget(target_size: Optional[float], target_drop: Optional[float], bit_choices: str):
    """The budget of --target-size / --target-drop, None without one."""
    if target_size is None and target_drop is None:
        return None
    from fddaq.config import BudgetConfig, parse_bit_choices

    return BudgetConfig(target_size, target_drop, parse_bit_choices(bit_choices))


def _quant_config(bits: int, weight_bits: Optional[int], act_bits: Optional[int], first_last_bits: Optional[int],
                  layer_bits: Optional[list[str]], weight_grid: str, activations: str):
    from fddaq.config import QuantConfig

    return QuantConfig(weight_bits or bits, act_bits or bits, first_last_bits, layers=tuple(layer_bits or ()),
                       weight_grid=weight_grid, activations=activations)


def _trust_model_option():
    return typer.Option(
        False, "--trust-model",
        help="Accept a pickled whole model (torch.save(model)): unpickling runs code from the file, so only for files you trust.",
    )


def _device_option():
    return typer.Option("auto", "--device", help="Where PyTorch runs: auto (a CUDA GPU when there is one), cpu, cuda or cuda:INDEX.")


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
def _processes(device):
    """The torchrun job this process belongs to (a job of one without torchrun), left at the end."""
    from fddaq.distributed import join, leave

    try:
        yield join(device)
    finally:
        leave()


def _seed_option():
    return typer.Option(0, "--seed", help="Random seed.")


def _synth_method_option(flag: str):
    return typer.Option(None, flag, help="How FDDA's losses make synthetic images: pool (optimise a pool of images started from "
                        "augmented calibration images) or generator (train the paper's conditional generator). Default: the recipe's.")


def _force_option():
    return typer.Option(False, "--force", help="Overwrite existing outputs.")


def _quiet_option():
    return typer.Option(False, "--quiet", "-q", help="No progress output; the table is still printed.")


_BITS = _bits_options()  # Typer reads option objects per command: one set each
_PLAN_BITS = _bits_options()
_QUANTIZE_BUDGET = _budget_options()
_PLAN_BUDGET = _budget_options()
_SENSITIVITY_BITS = _bits_options()


@app.command()
@user_errors
def quantize(
    ctx: typer.Context,
    model: Path = _model_option(),
    arch: str = _arch_option(),
    calib: Path = _calib_option(),
    val: Optional[Path] = typer.Option(None, "--val", help="Labelled validation images, same layout; used only to report."),
    bits: int = _BITS["bits"],
    weight_bits: Optional[int] = _BITS["weight_bits"],
    act_bits: Optional[int] = _BITS["act_bits"],
    first_last_bits: Optional[int] = _BITS["first_last_bits"],
    layer_bits: Optional[list[str]] = _BITS["layer_bits"],
    weight_grid: str = _BITS["weight_grid"],
    activations: str = _BITS["activations"],
    recipe: str = typer.Option(DEFAULT_RECIPE, "--recipe", help="reconstruct (default: block-wise reconstruction, AdaRound + LSQ + QDrop, unit by unit), fddaq (end-to-end fine-tuning on real and FDDA images), fdda-paper (the official recipe), ptq (calibration only) or data-free (synthetic images only; --calib then only measures the result)."),
    steps: Optional[int] = typer.Option(None, "--steps", help=f"Training steps: reconstruction iterations per unit (reconstruct: {RECONSTRUCT_ITERATIONS}) or fine-tuning steps (the others: 400); 0: calibration only."),
    synthetic: Optional[int] = typer.Option(None, "--synthetic", help="FDDA synthetic images added to the training images (fddaq, fdda-paper: 1024, mixed 1:1 into fine-tuning; reconstruct: 0, up to 512 join its pool); 0: real images only."),
    synth_steps: Optional[int] = typer.Option(None, "--synth-steps", help="FDDA synthesis steps (default 500)."),
    synth_method: Optional[str] = _synth_method_option("--synth-method"),
    synthetic_from: Optional[Path] = typer.Option(
        None, "--synthetic-from", help="Use the images of a synthetic.pt written by `fddaq synth` instead of synthesizing "
        "(all of them; any recipe that trains)."),
    seed: int = _seed_option(),
    num_classes: Optional[int] = _num_classes_option(),
    classes: Optional[Path] = _classes_option(),
    preset: Optional[str] = _preset_option(),
    input_size: Optional[int] = _input_size_option(),
    resize: Optional[int] = _resize_option(),
    mean: Optional[str] = _mean_option(),
    std: Optional[str] = _std_option(),
    trust_model: bool = _trust_model_option(),
    arch_arg: Optional[list[str]] = _arch_arg_option(),
    output: Optional[str] = _output_option(),
    max_drop: Optional[float] = typer.Option(None, "--max-drop", help="Fail with exit 3 if ONNX top-1 on --val is more than this many points below float."),
    target_size: Optional[float] = _QUANTIZE_BUDGET["target_size"],
    target_drop: Optional[float] = _QUANTIZE_BUDGET["target_drop"],
    bit_choices: str = _QUANTIZE_BUDGET["bit_choices"],
    out: Path = typer.Option(Path("out"), "--out", help="Output folder."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in --out (same options)."),
    device: str = _device_option(),
    force: bool = _force_option(),
    quiet: bool = _quiet_option(),
    config: Optional[Path] = _config_option(),
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

    _check_outputs(out, QUANTIZE_OUTPUTS, force)
    if max_drop is not None and val is None:
        raise ConfigError("--max-drop needs --val: the gate compares accuracy on labelled validation images")
    budget = _budget(target_size, target_drop, bit_choices)
    if budget is not None:
        act_bits = act_bits or max(budget.bit_choices)  # activation bits do not change the size
    quant = _quant_config(bits, weight_bits, act_bits, first_last_bits, layer_bits, weight_grid, activations)
    run_config = replace(recipe_config(recipe, quant, seed, steps, synthetic, synth_steps, synth_method), budget=budget)
    if synthetic_from is not None and run_config.finetune.steps == 0 and run_config.reconstruct.iterations == 0 \
            and run_config.real_images:
        raise ConfigError(f"--recipe {recipe} with --steps 0 does not train: the images of --synthetic-from would go unused")
    source = _source(model, arch, calib, val, num_classes, classes, preset, input_size, resize, mean, std, trust_model,
                     arch_arg, output)
    where = _resolve_device(device)
    with _processes(where) as ranks, _locked(out, ranks.is_main):
        with ProgressRenderer(console, quiet or not ranks.is_main) as progress:
            report = run_quantize(source, run_config, out, progress, resume, where, synthetic_from, max_drop)
        if report is None:  # another rank than 0 of a torchrun job: rank 0 reports
            return
        searched = report["precision"]
        if searched is None:
            _save_config(ctx, out)
            setting = f"W{quant.weight_bits}A{quant.act_bits}"
        else:  # the plan chosen, so that --config repeats it without searching
            _save_config(ctx, out, layer_bits=[*(layer_bits or ()), *searched["overrides"]], target_size=None,
                         target_drop=None, act_bits=quant.act_bits)
            setting = f"weights {'/'.join(map(str, searched['budget']['bit_choices']))}, A{quant.act_bits}"
        _show(f"fddaq quantize: {model.name} at {setting}, recipe {recipe}", report, out)
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
def synth(
    ctx: typer.Context,
    model: Path = _model_option(),
    arch: str = _arch_option(),
    calib: Optional[Path] = typer.Option(
        None, "--calib", help="Calibration images: DIR/<class>/<image> (or a flat folder); not needed with --recipe data-free."),
    recipe: str = typer.Option("fddaq", "--recipe", help="Whose synthesis settings: fddaq (a pool of images started from the "
                               "calibration images), fdda-paper (the paper's generator) or data-free (the generator on "
                               "the BN running statistics alone, without --calib; given --calib only measures the images)."),
    num: int = typer.Option(1024, "--num", help="Synthetic images to write."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Synthesis steps (default 500)."),
    method: Optional[str] = _synth_method_option("--method"),
    val: Optional[Path] = typer.Option(None, "--val", help="Held-out labelled real images: the reference for the quality figures."),
    seed: int = _seed_option(),
    num_classes: Optional[int] = _num_classes_option(),
    classes: Optional[Path] = _classes_option(),
    preset: Optional[str] = _preset_option(),
    input_size: Optional[int] = _input_size_option(),
    resize: Optional[int] = _resize_option(),
    mean: Optional[str] = _mean_option(),
    std: Optional[str] = _std_option(),
    trust_model: bool = _trust_model_option(),
    arch_arg: Optional[list[str]] = _arch_arg_option(),
    output: Optional[str] = _output_option(),
    out: Path = typer.Option(Path("synth"), "--out", help="Output folder."),
    device: str = _device_option(),
    force: bool = _force_option(),
    quiet: bool = _quiet_option(),
    config: Optional[Path] = _config_option(),
) -> None:
    """Make labelled synthetic images with FDDA's losses on the calibration images' BatchNorm
    statistics (a pool of images optimised from augmented calibration images, or the paper's
    conditional generator: --method) and write them (synthetic.pt), a preview grid and a report.

    Example: fddaq synth examples/fashion_mnist/model.pth --arch fddaq:fashion_resnet --calib examples/fashion_mnist/calib --num 1024 --out synth/
    """
    from cli.jobs import run_synth
    from fddaq.config import QuantConfig
    from fddaq.recipes import SYNTH_RECIPES, recipe_config

    _check_outputs(out, SYNTH_OUTPUTS, force)
    if recipe not in SYNTH_RECIPES:
        raise ConfigError(f"--recipe {recipe!r}: synthesis follows one of {', '.join(SYNTH_RECIPES)}")
    if num < 1:
        raise ConfigError(f"--num={num} must be at least 1")
    run_config = recipe_config(recipe, QuantConfig(), seed, synthetic=num, synth_steps=steps, synth_method=method)
    if calib is None and run_config.real_images:
        raise ConfigError(f"--recipe {recipe} synthesizes from calibration images: give --calib DIR (only --recipe "
                          "data-free runs without)")
    source = _source(model, arch, calib, val, num_classes, classes, preset, input_size, resize, mean, std, trust_model,
                     arch_arg, output)
    where = _resolve_device(device)
    with _processes(where) as ranks, _locked(out, ranks.is_main):
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
def export(
    checkpoint: Path = typer.Argument(..., help="quantized.pt written by `fddaq quantize`."),
    output: Path = typer.Option(Path("model.onnx"), "-o", "--output", help="ONNX file to write."),
    opset: int = typer.Option(21, "--opset", help="ONNX opset (21 or newer: INT4 types)."),
    int8_weights: bool = typer.Option(
        False, "--int8-weights",
        help="Store weights of 4 bits and fewer as INT8 (the same values; about twice the weight bytes): onnxruntime "
             "then runs symmetric-grid (--weight-grid symmetric) W4A8 convolutions on its 8-bit integer kernels."),
    force: bool = _force_option(),
    config: Optional[Path] = _config_option(),
) -> None:
    """Re-export the QDQ ONNX graph from a checkpoint alone.

    Example: fddaq export out/quantized.pt -o model.onnx
    """
    from exporters.deploy import export_checkpoint
    from fddaq.checkpoint import load_checkpoint
    from fddaq.io import atomic_write_bytes

    _check_file(output, force)
    start = time.perf_counter()
    data = export_checkpoint(load_checkpoint(checkpoint), opset, int8_weights)
    atomic_write_bytes(output, data)
    console.print(f"wrote {output} ({len(data) / 1024:.1f} KiB) in {time.perf_counter() - start:.1f}s")


@app.command()
@user_errors
def verify(
    onnx_file: Path = typer.Argument(..., help="QDQ ONNX file written by `fddaq quantize` or `fddaq export`."),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="quantized.pt the file was exported from."),
    data: Path = typer.Option(..., "--data", help="Images: DIR/<class>/<image> (accuracies too) or a flat folder."),
    min_agreement: float = typer.Option(99.0, "--min-agreement", help="Exit 3 when a top-1 agreement (optimizations off or on) is below this percentage."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the report as JSON to this file."),
    force: bool = _force_option(),
    quiet: bool = _quiet_option(),
    config: Optional[Path] = _config_option(),
) -> None:
    """Check that onnxruntime (CPU, graph optimizations off and on) reproduces the checkpoint's
    fake-quant model: top-1 agreement, logit and activation differences in quantization steps,
    accuracies, and which kernels the optimized graph runs.

    Example: fddaq verify out/model.onnx --checkpoint out/quantized.pt --data ./val
    """
    from fddaq.io import atomic_write_json

    from .jobs import run_verify

    _check_file(json_path, force)
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
def plan(
    model: Path = _model_option(),
    arch: str = _arch_option(),
    bits: int = _PLAN_BITS["bits"],
    weight_bits: Optional[int] = _PLAN_BITS["weight_bits"],
    act_bits: Optional[int] = _PLAN_BITS["act_bits"],
    first_last_bits: Optional[int] = _PLAN_BITS["first_last_bits"],
    layer_bits: Optional[list[str]] = _PLAN_BITS["layer_bits"],
    weight_grid: str = _PLAN_BITS["weight_grid"],
    activations: str = _PLAN_BITS["activations"],
    num_classes: Optional[int] = _num_classes_option(),
    preset: Optional[str] = _preset_option(),
    input_size: Optional[int] = _input_size_option(),
    resize: Optional[int] = _resize_option(),
    mean: Optional[str] = _mean_option(),
    std: Optional[str] = _std_option(),
    trust_model: bool = _trust_model_option(),
    arch_arg: Optional[list[str]] = _arch_arg_option(),
    output: Optional[str] = _output_option(),
    data: Optional[Path] = typer.Option(None, "--data", help="Calibration images (DIR/<class>/<image> or a flat folder) "
                                        "for --target-size / --target-drop: the plan is searched on them."),
    target_size: Optional[float] = _PLAN_BUDGET["target_size"],
    target_drop: Optional[float] = _PLAN_BUDGET["target_drop"],
    bit_choices: str = _PLAN_BUDGET["bit_choices"],
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the plan as JSON to this file."),
    force: bool = _force_option(),
    quiet: bool = _quiet_option(),
    config: Optional[Path] = _config_option(),
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

    _check_file(json_path, force)
    budget = _budget(target_size, target_drop, bit_choices)
    if budget is not None:
        act_bits = act_bits or max(budget.bit_choices)  # as quantize: activation bits do not change the size
        if data is None:
            raise ConfigError("--target-size and --target-drop need --data: the bit search measures plans on images")
    elif data is not None:
        raise ConfigError("--data is for the bit search: give --target-size or --target-drop too")
    quant = _quant_config(bits, weight_bits, act_bits, first_last_bits, layer_bits, weight_grid, activations)
    source = _source(model, arch, data, None, num_classes, None, preset, input_size, resize, mean, std, trust_model,
                     arch_arg, output)
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
def sensitivity(
    ctx: typer.Context,
    model: Path = _model_option(),
    arch: str = _arch_option(),
    calib: Path = _calib_option(),
    bits: int = _SENSITIVITY_BITS["bits"],
    weight_bits: Optional[int] = _SENSITIVITY_BITS["weight_bits"],
    act_bits: Optional[int] = _SENSITIVITY_BITS["act_bits"],
    first_last_bits: Optional[int] = _SENSITIVITY_BITS["first_last_bits"],
    layer_bits: Optional[list[str]] = _SENSITIVITY_BITS["layer_bits"],
    weight_grid: str = _SENSITIVITY_BITS["weight_grid"],
    activations: str = _SENSITIVITY_BITS["activations"],
    synthetic: int = typer.Option(0, "--synthetic", help="Also measure on this many FDDA synthetic images (trains the generator first)."),
    synth_steps: int = typer.Option(500, "--synth-steps", help="Generator training steps, with --synthetic."),
    seed: int = _seed_option(),
    num_classes: Optional[int] = _num_classes_option(),
    classes: Optional[Path] = _classes_option(),
    preset: Optional[str] = _preset_option(),
    input_size: Optional[int] = _input_size_option(),
    resize: Optional[int] = _resize_option(),
    mean: Optional[str] = _mean_option(),
    std: Optional[str] = _std_option(),
    trust_model: bool = _trust_model_option(),
    arch_arg: Optional[list[str]] = _arch_arg_option(),
    output: Optional[str] = _output_option(),
    out: Path = typer.Option(Path("sensitivity"), "--out", help="Output folder."),
    device: str = _device_option(),
    force: bool = _force_option(),
    quiet: bool = _quiet_option(),
    config: Optional[Path] = _config_option(),
) -> None:
    """Show where the model breaks at low bits: each quantizer (each layer's weights, each
    quantized input) ranked by the KL divergence of the output from float when it alone is at
    its bits, plus the whole model with only weights or only activations at their bits (the
    others at 8). Writes sensitivity.json, sensitivity.png (bar chart), config.toml, summary.md.

    Example: fddaq sensitivity examples/fashion_mnist/mobilenet.pth --arch fddaq:fashion_mobilenet --calib examples/fashion_mnist/calib --bits 4
    """
    from cli.jobs import run_sensitivity
    from fddaq.config import SynthConfig

    _check_outputs(out, SENSITIVITY_OUTPUTS, force)
    quant = _quant_config(bits, weight_bits, act_bits, first_last_bits, layer_bits, weight_grid, activations)
    synth_config = SynthConfig(steps=synth_steps, num_images=synthetic, seed=seed)
    source = _source(model, arch, calib, None, num_classes, classes, preset, input_size, resize, mean, std, trust_model,
                     arch_arg, output)
    with _locked(out):
        with ProgressRenderer(console, quiet) as progress:
            report = run_sensitivity(source, quant, out, synth_config, progress, _resolve_device(device))
        _save_config(ctx, out)
        _show(f"fddaq sensitivity: {model.name} at W{quant.weight_bits}A{quant.act_bits} (most sensitive first)", report, out)
    console.print(f"wrote {out / 'sensitivity.json'}, {out / 'sensitivity.png'}, {out / 'config.toml'}, {out / 'summary.md'}")


@app.command(name="eval")
@user_errors
def evaluate(
    model: Path = typer.Argument(..., help="A float state dict (with --arch), a quantized.pt checkpoint or an ONNX file."),
    data: Path = typer.Option(..., "--data", help="Labelled images: DIR/<class>/<image>."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Architecture of a float state dict (not needed for a checkpoint or ONNX file)."),
    num_classes: Optional[int] = _num_classes_option(),
    classes: Optional[Path] = _classes_option(),
    preset: Optional[str] = _preset_option(),
    input_size: Optional[int] = _input_size_option(),
    resize: Optional[int] = _resize_option(),
    mean: Optional[str] = _mean_option(),
    std: Optional[str] = _std_option(),
    trust_model: bool = _trust_model_option(),
    arch_arg: Optional[list[str]] = _arch_arg_option(),
    output: Optional[str] = _output_option(),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the result as JSON to this file."),
    device: str = _device_option(),
    force: bool = _force_option(),
    quiet: bool = _quiet_option(),
    config: Optional[Path] = _config_option(),
) -> None:
    """Top-1 and top-5 accuracy of a float model, a quantized checkpoint (PyTorch fake-quant) or
    an ONNX file (onnxruntime, preprocessing and classes from its metadata) on labelled images.

    Example: fddaq eval out/model.onnx --data examples/fashion_mnist/val
    """
    from fddaq.io import atomic_write_json

    from .jobs import run_eval

    if arch is not None and model.suffix == ".onnx":
        raise ConfigError("--arch is for a float state dict: an ONNX file carries its own graph")
    options = (preset, input_size, resize, mean, std)
    if arch is None and any(v is not None for v in (*options, num_classes, classes, arch_arg, output)):
        raise ConfigError("preprocessing and class options are for a float state dict (with --arch): "
                          "a checkpoint or ONNX file carries its own")
    source = _source(model, arch, data, None, num_classes, classes, *options, trust_model, arch_arg,
                     output) if arch is not None else None
    _check_file(json_path, force)
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
