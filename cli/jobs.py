"""What a command runs and writes: core job, export and verification, report. Every file is
written atomically, and only once everything it depends on has succeeded."""

from __future__ import annotations

import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from fddaq import __version__
from fddaq.checkpoint import checkpoint_bytes, load_checkpoint
from fddaq.config import QuantConfig, RunConfig, SynthConfig
from fddaq.data import ImageSet, class_folders, load_image_folder
from fddaq.distributed import current
from fddaq.errors import ConfigError, DataError
from fddaq.events import EventHandler
from fddaq.io import atomic_write_bytes, atomic_write_json, png_bytes, read_tensors, tensors_bytes
from fddaq.pipeline import (
    FloatModel,
    Inputs,
    QuantizeResult,
    ResumeState,
    Source,
    Synthesis,
    check_trainable,
    load_float,
    load_inputs,
    plan_layers,
    quantize,
    synthesize,
)
from fddaq.synth.preview import preview_grid

if TYPE_CHECKING:
    from exporters.deploy import Deployment
    from exporters.dry_run import DryRun


def checked_float(source: Source, quant: QuantConfig, config: RunConfig | None = None,
                  on_event: EventHandler | None = None) -> tuple[FloatModel, DryRun]:
    """The float model of `source`, after everything that could fail later was tried on it:
    the capture of what it computes, its scored output for `config` (None: synthesis alone),
    the layer plan, and a dry run of the export of it and of its quantized form
    (`exporters.dry_run`). Returns it and the dry run's figures (its seconds: all the checks')."""
    from dataclasses import replace

    from exporters.dry_run import dry_run
    from fddaq.events import emit

    start = time.perf_counter()
    emit(on_event, "check", 0, 1)
    loaded = load_float(source)
    check_trainable(loaded, config)
    checked = dry_run(loaded.model, loaded.capture, plan_layers(loaded, quant), loaded.output)
    emit(on_event, "check", 1, 1)
    return loaded, replace(checked, seconds=time.perf_counter() - start)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}%"


def _header(command: str, source: Source, config: dict, device: torch.device) -> dict:
    return {
        "fddaq_version": __version__,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "command": command,
        "device": _device_name(device),
        "processes": current().world,
        "inputs": {
            "model": str(source.model_path), "arch": source.arch, "calib": str(source.calib_dir),
            "val": None if source.val_dir is None else str(source.val_dir),
        },
        "config": config,
    }


def _device_name(device: torch.device) -> str:
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


def _data(inputs: Inputs) -> dict:
    return {
        "calib_images": len(inputs.calib), "calib_skipped": inputs.calib.skipped, "calib_layout": inputs.calib.layout,
        "calib_labelled": inputs.calib.labelled, "calib_float_top1": inputs.calib_top1,
        "warnings": [w for w in [inputs.class_order_warning()] if w],
        "val_images": None if inputs.val is None else len(inputs.val),
        "val_skipped": None if inputs.val is None else inputs.val.skipped,
    }


def _data_rows(inputs: Inputs) -> list[tuple[str, str]]:
    """The preprocessing, the images read and the unreadable files skipped (also in summary.md)."""
    rows = [("preprocessing", inputs.info.preprocess.describe())]
    for name, images in (("calibration images", inputs.calib), ("validation images", inputs.val)):
        if images is not None and (len(images) or images.skipped):
            skipped = f", {images.skipped} unreadable files skipped" if images.skipped else ""
            rows.append((name, f"{len(images)} ({images.layout}{skipped})"))
    warning = inputs.class_order_warning()
    return rows + ([("WARNING: class order", f"{warning} (give --classes FILE)")] if warning else [])


def _finite(value: float | None) -> float | None:
    """JSON has no infinity: None for a layer whose output equals the float one."""
    return None if value is None or value == float("inf") else round(value, 3)


def _worst_layers(sqnr: dict[str, float], count: int = 3) -> str:
    worst = sorted(sqnr.items(), key=lambda item: item[1])[:count]
    return ", ".join(f"{name} {value:.1f} dB" for name, value in worst) or "-"


def _synthesis_rows(synthesis: Synthesis) -> list[tuple[str, str]]:
    summary = synthesis.report
    rows = [
        ("BN layers / deep layers from", f"{summary.num_bn_layers} / {summary.deep_start}"),
        ("classes with a BNS center", str(summary.classes_with_center)),
        ("misclassified calibration images excluded", str(summary.misclassified_excluded)),
    ]
    for name, quality in summary.quality.items():
        rows.append((f"{name}: float top-1 / separation / diversity", quality.row()))
    return rows


def _steps(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g} steps"


def verify_rows(verify) -> list[tuple[str, str]]:
    """Table rows of a `VerifyReport` (first row: the plain agreement)."""
    ops = lambda counts: ", ".join(f"{n} {op}" for op, n in counts.items()) or "none"
    return [
        (f"ONNX vs fake-quant top-1 agreement ({verify.samples} images)", _pct(verify.agreement)),
        ("max / mean |logit diff|", f"{verify.max_abs_diff:.2e} / {verify.mean_abs_diff:.2e} "
                                    f"({_steps(verify.max_step_diff)} / {_steps(verify.mean_step_diff)})"),
        ("quantized activations that differ", f"{verify.activation_mismatches} of {verify.activation_values} "
                                              f"(max {verify.activation_max_step_diff} steps)"),
        ("  ... each layer fed the graph's inputs", f"{verify.local_mismatches} (max {verify.local_max_step_diff} steps)"),
        ("graph optimizations on: agreement, max diff", f"{_pct(verify.optimized_agreement)}, "
                                                        f"{_steps(verify.optimized_max_step_diff)}"),
        ("optimized graph: integer / float kernels", f"{ops(verify.integer_ops)} / {ops(verify.float_ops)}"),
    ]


def run_verify(onnx_path: Path, checkpoint_path: Path, data_dir: Path, min_agreement: float,
               on_event: EventHandler | None = None) -> dict:
    """Compare the ONNX file with the checkpoint's fake-quant model on the images of `data_dir`
    (accuracies too when it has class folders); `passed` says whether both agreements reach
    `min_agreement` percent."""
    from exporters.runtime import load_onnx, verify

    start = time.perf_counter()
    if not 0 <= min_agreement <= 100:
        raise ConfigError(f"--min-agreement={min_agreement} must be within 0..100 (a percentage)")
    graph = load_onnx(onnx_path)
    checkpoint = load_checkpoint(checkpoint_path)
    images = load_image_folder(data_dir, checkpoint.info.preprocess, checkpoint.info.class_names)
    result = verify(graph, checkpoint.model, images.images, images.labels if images.labelled else None, on_event=on_event)
    failures = []
    if min(result.agreement, result.optimized_agreement) < min_agreement:
        failures.append(f"top-1 agreement below {min_agreement}%")
    if result.activation_values == 0:  # a graph of another model, or one fddaq did not write
        failures.append("no quantized activation of the checkpoint could be compared: the graph has none of its "
                        "layers' quantized inputs (is it the checkpoint's export?)")
    report = {
        "fddaq_version": __version__,
        "command": "verify",
        "inputs": {"onnx": str(onnx_path), "checkpoint": str(checkpoint_path), "data": str(data_dir)},
        "data": {"images": len(images), "skipped": images.skipped, "labelled": images.labelled},
        "verify": result.to_json(),
        "gate": {"min_agreement": min_agreement, "passed": not failures, "failures": failures},
        "timings_s": {"total": time.perf_counter() - start},
    }
    report["table"] = [
        *verify_rows(result),
        ("ONNX top-1 (optimizations off / on)", f"{_pct(result.onnx_top1)} / {_pct(result.optimized_top1)}"),
        ("fake-quant top-1", _pct(result.torch_top1)),
        ("time", f"{report['timings_s']['total']:.2f}s"),
    ]
    return report


def _eval_logits(model_path: Path, data_dir: Path, source: Source | None, on_event: EventHandler | None,
                 device: torch.device) -> tuple[str, ImageSet, np.ndarray]:
    """(kind, the labelled images, the class logits) of `run_eval`'s model on them."""
    from fddaq.device import pin, place
    from fddaq.evaluate import class_logits, predict
    from fddaq.events import emit

    def batches(run, x: torch.Tensor, size: int = 256) -> np.ndarray:
        total = -(-len(x) // size)
        emit(on_event, "evaluate", 0, total)
        out = []
        for index in range(total):
            out.append(np.asarray(run(x[index * size : (index + 1) * size])))
            emit(on_event, "evaluate", index + 1, total)
        return class_logits(torch.from_numpy(np.concatenate(out))).numpy()

    if source is not None:
        # a flat folder would be labelled by the float model's own predictions: refuse it first
        if data_dir.is_dir() and not class_folders(data_dir):
            raise DataError(f"{data_dir} must hold one folder per class to measure accuracy")
        inputs = load_inputs(source, device)
        model = place(inputs.teacher, device)
        return "float", inputs.calib, batches(lambda x: predict(model, x), inputs.calib.images)
    if model_path.suffix == ".onnx":
        from exporters.metadata import read_metadata
        from exporters.runtime import inference_session, run_session

        metadata = read_metadata(model_path)
        images = load_image_folder(data_dir, metadata.preprocess, metadata.class_names)
        session = inference_session(model_path, optimize=True)
        return "onnx", images, batches(lambda x: run_session(session, x, output=metadata.scored_output), images.images)
    checkpoint = load_checkpoint(model_path)
    images = load_image_folder(data_dir, checkpoint.info.preprocess, checkpoint.info.class_names, pin_memory=pin(device))
    model = place(checkpoint.model, device)
    return "checkpoint", images, batches(lambda x: predict(model, x), images.images)


def run_eval(model_path: Path, data_dir: Path, source: Source | None, on_event: EventHandler | None = None,
             device: torch.device = torch.device("cpu")) -> dict:
    """Accuracy on the labelled images of `data_dir` of an ONNX file (onnxruntime, all graph
    optimizations), a quantized checkpoint (`source` None) or a float model (`source`); PyTorch
    models run on `device`."""
    start = time.perf_counter()
    kind, images, logits = _eval_logits(model_path, data_dir, source, on_event, device)
    if not images.labelled:
        raise DataError(f"{data_dir} must hold one folder per class to measure accuracy")
    labels = images.labels.numpy()
    top5 = np.argsort(-logits, axis=1)[:, :5]
    result = {
        "top1": 100.0 * float((logits.argmax(1) == labels).mean()),
        "top5": 100.0 * float((top5 == labels[:, None]).any(1).mean()),
    }
    report = {
        "fddaq_version": __version__,
        "command": "eval",
        "kind": kind,
        "device": "cpu (onnxruntime)" if kind == "onnx" else _device_name(device),
        "inputs": {"model": str(model_path), "data": str(data_dir)},
        "data": {"images": len(images), "skipped": images.skipped, "classes": len(images.class_names)},
        "accuracy": result,
        "timings_s": {"total": time.perf_counter() - start},
    }
    report["table"] = [
        ("images", f"{len(images)} ({images.skipped} skipped)"),
        ("top-1", _pct(result["top1"])),
        ("top-5", _pct(result["top5"])),
        ("time", f"{report['timings_s']['total']:.2f}s"),
    ]
    return report


def run_synth(source: Source, config: SynthConfig, out: Path, on_event: EventHandler | None = None,
              device: torch.device = torch.device("cpu"), real_images: bool = True) -> dict | None:
    """Synthesize on `device` (data-free without `real_images`: the calibration images, if
    any, only measure); write synthetic.pt, preview.png and report.json into `out`."""
    start = time.perf_counter()
    loaded, checked = checked_float(source, QuantConfig(), on_event=on_event)
    inputs = load_inputs(source, device, loaded)
    ranks = current()
    synthesis = synthesize(inputs, config, on_event, real_images, device, ranks=ranks)
    if not ranks.is_main:  # a torchrun job: rank 0 writes
        return None
    report = {
        **_header("synth", source, {**config.to_json(), "real_images": real_images}, device),
        "model": inputs.info.to_json(),
        "data": _data(inputs),
        "synthesis": synthesis.report.to_json(),
        "timings_s": {"check": checked.seconds, "load": inputs.seconds, "synthesize": synthesis.seconds,
                      "total": time.perf_counter() - start},
    }
    report["table"] = [
        *_data_rows(inputs),
        ("synthetic images", str(len(synthesis.labels))),
        *_synthesis_rows(synthesis),
        ("seconds per generator step", f"{report['synthesis']['seconds_per_step']:.3f}"),
        *((f"time: {stage}", f"{seconds:.2f}s") for stage, seconds in report["timings_s"].items()),
    ]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "synthetic.pt", tensors_bytes({"images": synthesis.images.contiguous(), "labels": synthesis.labels}))
    atomic_write_bytes(out / "preview.png", png_bytes(preview_grid(synthesis.images, synthesis.labels, inputs.info.preprocess, inputs.info.class_names)))
    atomic_write_json(out / "report.json", report)
    return report


def _reconstruct_row(result) -> tuple[str, str]:
    return (f"reconstruction: {result.units} units, {result.layers} layers, {result.pool} images",
            f"unit error {result.loss_before:.4g} -> {result.loss_after:.4g} (mean)")


SENSITIVITY_ROWS = 40  # quantizers in the table and the chart (the JSON has all)


def run_sensitivity(source: Source, quant: QuantConfig, out: Path, synth: SynthConfig,
                    on_event: EventHandler | None = None, device: torch.device = torch.device("cpu")) -> dict:
    """Rank every quantizer of the plan by the divergence it alone causes (`fddaq.sensitivity`);
    write sensitivity.json and sensitivity.png into `out`."""
    from fddaq.sensitivity import sensitivity

    from .charts import bar_chart

    start = time.perf_counter()
    loaded, checked = checked_float(source, quant, on_event=on_event)
    inputs = load_inputs(source, device, loaded)
    synthetic = None
    if synth.num_images:
        synthetic = synthesize(inputs, synth, on_event, device=device, ranks=current()).images
    found = sensitivity(inputs.float_model, inputs.capture, inputs.info.output, quant, inputs.calib.images, synthetic,
                        on_event=on_event)
    report = {
        **_header("sensitivity", source, {"quant": found.quant.__dict__, "synth": synth.to_json()}, device),
        "model": inputs.info.to_json(),
        "data": _data(inputs),
        "sensitivity": found.to_json(),
        "timings_s": {"check": checked.seconds, "total": time.perf_counter() - start},
    }

    def cells(d) -> str:
        text = f"KL {d.kl:.4f}, agreement {d.agreement:.1f}%"
        return text if d.kl_synthetic is None else f"{text}; synthetic: KL {d.kl_synthetic:.4f}, {d.agreement_synthetic:.1f}%"

    report["table"] = [
        *((f"all at {name}", cells(d)) for name, d in found.splits.items()),
        *((f"{q.layer} {q.role} ({q.bits} bits)", cells(q.divergence)) for q in found.quantizers[:SENSITIVITY_ROWS]),
    ]
    out.mkdir(parents=True, exist_ok=True)
    chart = [(f"{q.layer} {q.role}", q.divergence.kl) for q in found.quantizers[:SENSITIVITY_ROWS]]
    title = (f"{source.model_path.name}: KL from float with one quantizer at its bits "
             f"(W{quant.weight_bits}A{quant.act_bits}, {len(inputs.calib)} calibration images)")
    atomic_write_bytes(out / "sensitivity.png", png_bytes(bar_chart(title, chart, "nats")))
    atomic_write_json(out / "sensitivity.json", report)
    return report


RESUME_FILE = "resume.pt"


def read_resume_state(out: Path) -> ResumeState:
    """The state an interrupted `quantize --out out` left behind."""
    path = out / RESUME_FILE
    if not path.is_file():
        raise ConfigError(f"nothing to resume: {path} does not exist (it is written while synthesis, reconstruction and fine-tuning run)")
    try:
        return ResumeState.from_dict(read_tensors(path, "a resumable fddaq state", ConfigError))
    except ConfigError as exc:
        raise ConfigError(f"{exc}: run without --resume") from None


def read_synthetic(path: Path) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(images, labels, path) of a synthetic.pt written by `fddaq synth`."""
    data = read_tensors(path, "a synthetic.pt of `fddaq synth`", DataError)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), torch.Tensor) for k in ("images", "labels")):
        raise DataError(f"{path} is not a synthetic.pt of `fddaq synth`: it needs tensors 'images' and 'labels'")
    return data["images"], data["labels"], str(path)


def precision_report(precision, onnx_ratio: float | None, act_bits: int) -> dict:
    """The bit search in report.json: what was searched and chosen, each searched layer's
    sensitivity, the curve, and whether the budget is met by the written file (`onnx_ratio`:
    its size against the float file; the search chose by a size model) or, with no file
    written (None: `plan`), by the size model's prediction."""
    budget = precision.budget
    chosen = precision.chosen
    predicted = onnx_ratio is None
    onnx_ratio = chosen.ratio if predicted else onnx_ratio
    met = precision.met and (budget.target_size is None or onnx_ratio <= budget.target_size)
    counts = {bits: sum(b == bits for b in chosen.bits.values()) for bits in budget.bit_choices}
    plan = ", ".join(f"{n} layers at {bits}" for bits, n in counts.items() if n)
    where = (f"{onnx_ratio:.3f}x float{' (predicted)' if predicted else ''}, {chosen.drop:.2f} points of agreement lost on {precision.views} views of "
             f"{precision.held_out} held-out calibration images")
    if budget.target_size is not None:
        want = f"at most {budget.target_size:g}x float"
    else:
        want = f"at most {budget.target_drop:g} points lost"
    if met:
        verdict = f"met ({want}): {plan}; {where}"
    elif budget.target_size is not None and precision.met:
        verdict = (f"missed ({want}): the file is {onnx_ratio:.3f}x float, where the size model predicted "
                   f"{chosen.ratio:.3f}x; {plan}")
    else:
        verdict = f"missed ({want}): the closest plan, {plan}, is {where}"
    return {
        **precision.to_json(), "met": met, "verdict": verdict, "onnx_ratio": onnx_ratio, "predicted": predicted,
        "act_bits": act_bits,
    }


def searched_reason(report: dict | None, layer: str) -> str | None:
    """Why the bit search (`precision_report`) gave `layer` its bits; None for a layer it did not search."""
    if report is None or layer not in report["sensitivity"]:
        return None
    return "bit search: KL from float with this layer alone at " + ", ".join(
        f"{bits} bits {kl:.2g}" for bits, kl in report["sensitivity"][layer].items())


def precision_chart(report: dict) -> np.ndarray:
    from .charts import curve_chart

    budget = report["budget"]
    points = [(p["ratio"], 100.0 - p["drop"], "curve") for p in report["points"] if p["drop"] is not None]
    points += [(p["ratio"], 100.0 - p["drop"], name) for name, p in report["uniform"].items()]
    points.append((report["chosen"]["ratio"], 100.0 - report["chosen"]["drop"], "chosen"))
    target = None if budget["target_drop"] is None else 100.0 - budget["target_drop"]
    return curve_chart(f"bit search: {report['verdict'][:110]}", points, budget["target_size"], target)


def run_quantize(
    source: Source, config: RunConfig, out: Path, on_event: EventHandler | None = None, resume: bool = False,
    device: torch.device = torch.device("cpu"), synthetic_from: Path | None = None, max_drop: float | None = None,
) -> dict | None:
    """Quantize (on `device`), export, verify (on the CPU, against onnxruntime's CPU kernels);
    write quantized.pt, model.onnx, report.json (and preview.png when synthetic data was used)
    into `out`. While synthesizing, reconstructing and fine-tuning, `out/resume.pt` holds the
    latest resumable state; `resume` continues from it. It is removed once all is written.
    `synthetic_from`: a synthetic.pt whose images are used instead of synthesizing. `max_drop`:
    the quality gate (points of ONNX top-1 below float on val), recorded with its outcome."""
    from exporters.deploy import deploy

    start = time.perf_counter()
    synthetic = None
    if synthetic_from is not None:
        synthetic = read_synthetic(synthetic_from)
        config = replace(config, synth=replace(config.synth, num_images=len(synthetic[1])), auto_synthesis=False)
    state = read_resume_state(out) if resume else None
    loaded, checked = checked_float(source, config.quant, config, on_event)
    result = quantize(source, config, on_event, lambda s: atomic_write_bytes(out / RESUME_FILE, tensors_bytes(s.to_dict())), state,
                      device, loaded, synthetic)
    if not current().is_main:  # a torchrun job: rank 0 exports, verifies and writes
        return None
    inputs = result.inputs
    checkpoint = checkpoint_bytes(result.model, result.plan, inputs.info, {"config": result.config.to_json()})
    check = inputs.val or inputs.calib
    deployment = deploy(result.model, checked.float_bytes, inputs.info, result.plan, check.images,
                        check.labels if inputs.val is not None else None, on_event=on_event)
    timings = {"check": checked.seconds, **result.timings, **deployment.timings, "total": time.perf_counter() - start}
    report = _quantize_report(result, deployment, source, device, max_drop, timings)
    atomic_write_bytes(out / "quantized.pt", checkpoint)
    atomic_write_bytes(out / "model.onnx", deployment.onnx)
    if result.synthesis is not None:
        s = result.synthesis
        atomic_write_bytes(out / "preview.png", png_bytes(preview_grid(s.images, s.labels, inputs.info.preprocess, inputs.info.class_names)))
    if report["precision"] is not None:
        atomic_write_bytes(out / "precision.png", png_bytes(precision_chart(report["precision"])))
    atomic_write_json(out / "report.json", report)
    (out / RESUME_FILE).unlink(missing_ok=True)
    return report


def _quantize_report(result: QuantizeResult, deployment: Deployment, source: Source, device: torch.device,
                     max_drop: float | None, timings: dict[str, float]) -> dict:
    """report.json of a quantize run, with its table (`_quantize_table`)."""
    inputs, verify = result.inputs, deployment.verify
    drop = None
    if result.float_top1 is not None and verify.onnx_top1 is not None:
        drop = result.float_top1 - verify.onnx_top1
    header = _header("quantize", source, result.config.to_json(), device)
    header["versions"].update(deployment.versions)
    onnx_ratio = len(deployment.onnx) / deployment.float_size
    precision = None if result.precision is None else precision_report(result.precision, onnx_ratio,
                                                                       result.config.quant.act_bits)
    report = {
        **header,
        "model": inputs.info.to_json(),
        "plan": result.plan.to_json(),
        "precision": precision,
        "tensors": {site.name: site.bits for site in result.model.sites},  # quantized between operators (--activations)
        "data": {**_data(inputs), "verify_set": "val" if inputs.val is not None else "calib"},
        "synthesis": None if result.synthesis is None else result.synthesis.report.to_json(),
        "synthesis_choice": result.synthesis_why,
        "accuracy": {
            "float_top1": result.float_top1,
            "fake_quant_top1": verify.torch_top1,
            "onnx_top1": verify.onnx_top1,
            "onnx_vs_fake_quant_agreement": verify.agreement,
        },
        "verify": verify.to_json(),
        "size": {
            "float_onnx_bytes": deployment.float_size,
            "onnx_bytes": len(deployment.onnx),
            "ratio": len(deployment.onnx) / deployment.float_size,
        },
        "reconstruct": None if result.reconstruct is None else result.reconstruct.to_json(),
        "finetune": result.finetune.to_json(),
        "layers": [
            {**entry, "sqnr_db": _finite(result.layer_sqnr.get(entry["name"])),
             "reason": searched_reason(precision, entry["name"]) or entry["reason"]}
            for entry in result.plan.to_json()
        ],
        "timings_s": timings,
        "gate": {"drop": drop, "max_drop": max_drop,
                 "passed": None if max_drop is None or drop is None else bool(drop <= max_drop)},
    }
    report["table"] = _quantize_table(result, deployment, report, timings)
    return report


def _quantize_table(result: QuantizeResult, deployment: Deployment, report: dict, timings: dict[str, float],
                    ) -> list[tuple[str, str]]:
    """The rows `quantize` prints and writes to summary.md."""
    inputs, verify, precision, gate = result.inputs, deployment.verify, report["precision"], report["gate"]
    return [
        *_data_rows(inputs),
        ("float top-1 (val)", _pct(result.float_top1)),
        ("fake-quant top-1 (val)", _pct(verify.torch_top1)),
        ("ONNX top-1 (val)", _pct(verify.onnx_top1)),
        *([] if gate["max_drop"] is None else [("quality gate (--max-drop)", f"{'passed' if gate['passed'] else 'FAILED'}: "
                                                f"{gate['drop']:.2f} points below float, at most {gate['max_drop']:g} allowed")]),
        (f"ONNX vs fake-quant top-1 agreement ({report['data']['verify_set']}, {verify.samples} images)", _pct(verify.agreement)),
        *verify_rows(verify)[1:],
        ("activations quantized", f"every tensor between operators ({len(report['tensors'])} tensors)"
                                  if result.model.sites else "the inputs of the layers"),
        ("ONNX size vs float ONNX", f"{len(deployment.onnx) / 1024:.1f} KiB / {deployment.float_size / 1024:.1f} KiB "
                                     f"= {report['size']['ratio']:.3f}x"),
        ("lowest layer SQNR vs float", _worst_layers(result.layer_sqnr)),
        *([] if precision is None else [("bit search (--target-size/--target-drop)", precision["verdict"])]),
        *([] if result.reconstruct is None else [_reconstruct_row(result.reconstruct)]),
        ("synthetic images", result.synthesis_why),
        *([] if result.synthesis is None else _synthesis_rows(result.synthesis)),
        *((f"time: {stage}", f"{seconds:.2f}s") for stage, seconds in timings.items()),
    ]
