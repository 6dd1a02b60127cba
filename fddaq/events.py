"""Progress events: core loops never print; they call `on_event(Event)` and the CLI renders.
And the loss a report gives for either end of a training curve (`curve_end`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


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


def curve_end(values: list[float], first: bool = False) -> float:
    """The mean of a loss curve's last (or `first`) values, over a tenth of the curve, 1 to 50
    of them: the loss at that end, without one step's noise. NaN for an empty curve."""
    if not values:
        return float("nan")
    window = max(1, min(50, len(values) // 10))
    part = values[:window] if first else values[-window:]
    return sum(part) / window
