"""Turn core events into progress bars (terminal) or plain lines (CI logs), and render tables."""

from __future__ import annotations

import os
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from fddaq.events import Event

STAGE_TITLES = {
    "check": "Checking the model exports (capture, dry run)",
    "calibrate": "Calibrating ranges",
    "bias": "Correcting biases",
    "synthesize": "Training the FDDA generator",
    "generate": "Generating synthetic images",
    "reconstruct": "Reconstructing blocks",
    "sensitivity": "Measuring each quantizer's sensitivity",
    "bit search": "Searching weight bits for the budget",
    "finetune": "Fine-tuning (distillation)",
    "evaluate": "Evaluating (accuracy, per-layer SQNR)",
    "export": "Exporting ONNX",
    "verify": "Verifying in onnxruntime",
}


class ProgressRenderer:
    """Callable `on_event`: a rich progress bar per stage on a terminal; on anything else a
    line when a stage starts, every ~10% but at most every `FDDAQ_PROGRESS_SECONDS` seconds
    (environment; default 5), and when it ends. Silent when `quiet`."""

    def __init__(self, console: Console, quiet: bool = False) -> None:
        self.console = console
        self.quiet = quiet
        self.live = console.is_terminal and not quiet
        self.progress: Progress | None = None
        self.tasks: dict[str, int] = {}
        self.started: dict[str, float] = {}
        self.printed: dict[str, float] = {}  # when each stage last printed a line
        self.interval = float(os.environ.get("FDDAQ_PROGRESS_SECONDS", 5))

    def __enter__(self) -> ProgressRenderer:
        if self.live:
            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[metrics]}"), TimeElapsedColumn(), TextColumn("ETA"),
                TimeRemainingColumn(), console=self.console,
            )
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def __call__(self, event: Event) -> None:
        if self.quiet or event.total == 0:  # a stage with nothing to do (fine-tuning after reconstruction)
            return
        title = STAGE_TITLES.get(event.stage, event.stage)
        metrics = "  ".join(f"{k} {v:.4g}" for k, v in event.metrics.items())
        if self.progress is not None:
            if event.stage not in self.tasks:
                self.tasks[event.stage] = self.progress.add_task(title, total=event.total, metrics="")
            self.progress.update(self.tasks[event.stage], completed=event.step, metrics=metrics)
            return
        now = time.perf_counter()
        if event.step == 0:
            self.started[event.stage] = self.printed[event.stage] = now
            self.console.print(f"{title}: {event.total} steps")
        elif event.step == event.total or (event.step % max(1, event.total // 10) == 0
                                           and now - self.printed.get(event.stage, 0.0) >= self.interval):
            self.printed[event.stage] = now
            elapsed = now - self.started.get(event.stage, now)
            self.console.print(f"{title}: {event.step}/{event.total} {metrics} ({elapsed:.0f}s)")


def table(title: str, rows: list[tuple[str, str]]) -> Table:
    out = Table(title=title, show_header=False, title_justify="left")
    out.add_column(style="bold")
    out.add_column(justify="right")
    for key, value in rows:
        out.add_row(key, value)
    return out


def markdown(title: str, rows: list[tuple[str, str]], layers: list[dict] | None = None) -> str:
    """The Markdown summary of a command: its table, then the layer plan with each layer's
    SQNR when given (a CI job summary, `summary.md`)."""
    cell = lambda value: str(value).replace("|", "\\|")
    lines = [f"### {cell(title)}", "", "| | |", "|---|---|", *(f"| {cell(k)} | {cell(v)} |" for k, v in rows)]
    if layers:
        lines += ["", "| layer | kind | weight bits | input bits | SQNR vs float (dB) | why |", "|---|---|---|---|---|---|"]
        for entry in layers:
            sqnr = entry.get("sqnr_db")
            lines.append(
                f"| {cell(entry['name'])} | {entry['kind']} | {entry['weight_bits'] or '-'} | {entry['act_bits'] or '-'} | "
                f"{'-' if sqnr is None else f'{sqnr:.1f}'} | {cell(entry['reason'])} |"
            )
    return "\n".join(lines) + "\n"
