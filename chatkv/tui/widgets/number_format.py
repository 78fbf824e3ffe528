"""Numbers written for people: bytes in KiB/MiB/GiB, token counts with separators, rates, percentages, times.

The stats panel refreshes several times a second, so every function here is plain arithmetic on one value.
A width that does not change from one refresh to the next matters as much as precision: one decimal below 100,
none above, so that a figure does not jump left and right as it grows.
"""

from __future__ import annotations

NO_VALUE = "–"
"""Shown where a figure is undefined (a hit rate before any prompt), rather than a misleading 0."""

_BYTE_UNITS = ("KiB", "MiB", "GiB", "TiB")


def format_bytes(count: int) -> str:
    """1536 -> '1.5 KiB'. KV sizes are powers of two in practice, so binary units read cleanly."""
    if count < 1024:
        return f"{count} B"
    value = float(count)
    for unit in _BYTE_UNITS:
        value /= 1024
        if value < 1024 or unit == _BYTE_UNITS[-1]:
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    raise AssertionError("unreachable: the last unit always returns")


def format_count(count: int) -> str:
    """12345 -> '12,345'; from ten million on, '12.3M' keeps the panel's columns narrow."""
    if count < 10_000_000:
        return f"{count:,}"
    return f"{count / 1_000_000:.1f}M"


def format_rate(tokens_per_second: float) -> str:
    """Tokens per second: '26.4 tok/s', '2,345 tok/s'."""
    if tokens_per_second < 100:
        return f"{tokens_per_second:.1f} tok/s"
    return f"{tokens_per_second:,.0f} tok/s"


def format_percent(fraction: float | None) -> str:
    """0.921 -> '92.1%'; None (nothing measured yet) -> '–'."""
    if fraction is None:
        return NO_VALUE
    return f"{fraction * 100:.1f}%"


def format_ms(milliseconds: float) -> str:
    """'87 ms' below a second, '1.25 s' above, where milliseconds stop being readable."""
    if milliseconds < 1000:
        return f"{milliseconds:.0f} ms"
    return f"{milliseconds / 1000:.2f} s"


def format_average(value: float) -> str:
    """An average of small counts (sessions per forward pass, queue depth): '3.25'."""
    return f"{value:.2f}"


def format_quantity(count: int, noun: str) -> str:
    """A count with its noun, singular for one: '1 session', '12,345 turns'."""
    return f"{format_count(count)} {noun if count == 1 else noun + 's'}"
