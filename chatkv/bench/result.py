"""What a scenario hands back: its parameters, its measured figures, the exactness check, and tables for people.

The JSON of ``chatkv bench --json`` is ``ScenarioResult.to_json`` for each scenario; the terminal
tables are built from the same figures, so the two never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["ok", "unavailable", "check_failed", "error"]


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def add(self, *cells: Any) -> None:
        self.rows.append([str(cell) for cell in cells])


@dataclass
class ScenarioResult:
    name: str
    status: Status = "ok"
    reason: str = ""  # why it is unavailable, failed its check or raised
    parameters: dict[str, Any] = field(default_factory=dict)
    # one mapping per system measured ("chatkv", "generate", "no_cache", ...) plus "comparison" for ratios
    figures: dict[str, Any] = field(default_factory=dict)
    check: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    tables: list[Table] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"status": self.status}
        if self.reason:
            data["reason"] = self.reason
        data.update(parameters=self.parameters, figures=self.figures, check=self.check, notes=self.notes,
                    seconds=round(self.seconds, 3))
        return data


def fmt(value: Any, digits: int = 1) -> str:
    """A figure for a table cell: thousands separated, a dash for missing values."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def times(value: float | None) -> str:
    """A speed-up ratio as '3.2x'."""
    return "-" if value is None else f"{value:.2f}x"
