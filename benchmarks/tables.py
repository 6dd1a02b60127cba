"""Markdown tables, as the benchmarks print them for RESULTS.md."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def header(*columns: str) -> str:
    """A table's header line and separator line."""
    return "| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|"


def row(*cells: object) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    return "\n".join([header(*columns), *(row(*cells) for cells in rows)])
