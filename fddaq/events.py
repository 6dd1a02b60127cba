"""Progress events: core loops never print; they call `on_event(Event)` and the CLI renders."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Event:
    """`stage` started (step 0), advanced (0 < step <= total) or finished (step == total).

    `metrics` carries numbers worth showing next to the progress (loss, accuracy...)."""

    stage: str
    step: int
    total: int
    metrics: dict[str, float] = field(default_factory=dict)


EventHandler = Callable[[Event], None]


def emit(on_event: EventHandler | None, stage: str, step: int, total: int, **metrics: float) -> None:
    if on_event is not None:
        on_event(Event(stage, step, total, dict(metrics)))
