"""Terminal output: progress lines while the bench runs (stderr) and a table per scenario at the end (stdout)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from chatkv.bench.result import ScenarioResult, Table


class Progress:
    """Timestamped progress lines on stderr, so a run of several minutes shows what it is doing."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self._stream = stream
        self._started = time.perf_counter()

    def __call__(self, message: str) -> None:
        elapsed = time.perf_counter() - self._started
        print(f"[{elapsed:6.1f}s] {message}", file=self._stream, flush=True)


def render_table(table: Table) -> str:
    widths = [len(column) for column in table.columns]
    for row in table.rows:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))

    def line(cells: list[str]) -> str:
        # the first column names the row; figures line up on the right
        parts = [cells[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([table.title, line(table.columns), rule, *(line(row) for row in table.rows)])


def render_scenario(result: ScenarioResult) -> str:
    heading = f"== {result.name} =="
    if result.status == "unavailable":
        return f"{heading}\nunavailable: {result.reason}"
    parts = [heading]
    if result.status != "ok":
        parts.append(f"{result.status.replace('_', ' ')}: {result.reason}")
    if result.check is not None:
        parts.append(f"exactness check: {result.check.get('summary', '')}")
    parts.extend(render_table(table) for table in result.tables)
    parts.extend(f"note: {note}" for note in result.notes)
    return "\n\n".join(parts)


def print_report(results: list[ScenarioResult], machine: dict, stream: TextIO = sys.stdout) -> None:
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, "
          f"{machine['model']} in {machine['dtype']}", file=stream)
    for result in results:
        print(f"\n{render_scenario(result)}", file=stream)
