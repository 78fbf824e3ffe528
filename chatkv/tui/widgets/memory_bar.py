"""A one-line bar of KV memory: what is held now, the highest it has been, and the budget as the full width.

Textual's ProgressBar shows one value; the KV store has two that matter together (current and peak), so this
draws its own line: used cells, then free cells, with a marker where the peak reached. Colours come from
component classes, so every theme styles it through CSS.
"""

from __future__ import annotations

from rich.text import Text
from textual.widget import Widget

USED_CELL = "━"
FREE_CELL = "━"
PEAK_MARK = "┃"
HIGH_USE_FRACTION = 0.9
"""From this share of the budget on, the used part takes the warning colour: evictions are near."""


class MemoryBar(Widget, can_focus=False):
    """KV bytes held against the budget; ``set_usage`` redraws only when what it would draw changes."""

    COMPONENT_CLASSES = {"memory-bar--used", "memory-bar--high", "memory-bar--free", "memory-bar--peak"}

    DEFAULT_CSS = """
    MemoryBar {
        height: 1;
        width: 1fr;
        & > .memory-bar--used { color: $primary; }
        & > .memory-bar--high { color: $warning; }
        & > .memory-bar--free { color: $foreground 15%; }
        & > .memory-bar--peak { color: $accent; }
    }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.current_bytes = 0
        self.peak_bytes = 0
        self.budget_bytes = 0

    def set_usage(self, current_bytes: int, peak_bytes: int, budget_bytes: int) -> None:
        usage = (current_bytes, peak_bytes, budget_bytes)
        if usage == (self.current_bytes, self.peak_bytes, self.budget_bytes):
            return
        self.current_bytes, self.peak_bytes, self.budget_bytes = usage
        self.refresh()

    def cells(self, width: int) -> tuple[int, int | None]:
        """How many cells are used, and the cell of the peak marker (None when it would sit on the used part)."""
        if width <= 0 or self.budget_bytes <= 0:
            return 0, None
        used = min(width, round(width * self.current_bytes / self.budget_bytes))
        # The peak is the highest the store has held, so it sits at or past the used part; a peak above the
        # budget (the store overshoots by one session before it evicts) is pinned to the last cell.
        peak = min(width - 1, round(width * self.peak_bytes / self.budget_bytes) - 1)
        return used, peak if peak >= used else None

    def render(self) -> Text:
        width = self.size.width
        used, peak = self.cells(width)
        high = self.budget_bytes > 0 and self.current_bytes >= HIGH_USE_FRACTION * self.budget_bytes
        used_style = self.get_component_rich_style("memory-bar--high" if high else "memory-bar--used")
        free_style = self.get_component_rich_style("memory-bar--free")
        peak_style = self.get_component_rich_style("memory-bar--peak")
        bar = Text(USED_CELL * used, style=used_style, end="", no_wrap=True)
        if peak is None:
            bar.append(FREE_CELL * (width - used), free_style)
        else:
            bar.append(FREE_CELL * (peak - used), free_style)
            bar.append(PEAK_MARK, peak_style)
            bar.append(FREE_CELL * (width - peak - 1), free_style)
        return bar
