"""The live panel beside the chats: what the KV cache, the batcher and the snapshot tier are doing right now.

Every figure is read from the engine's ``EngineStats`` and the current tab's ``SessionStats``; the panel
only formats them (docs/contracts.md, Metrics, defines each one). The App calls ``show_stats`` several times a second, so
the widgets are built once in ``compose`` and each refresh rewrites only the sections whose text changed:
no widget is created or removed after mounting, and an unchanged figure costs one comparison.
"""

from __future__ import annotations

from collections.abc import Sequence

from textual.app import ComposeResult
from textual.content import Content
from textual.widget import Widget
from textual.widgets import Label, Sparkline, Static

from chatkv.engine.api import EngineStats, SessionStats
from chatkv.engine.metrics import WINDOW_SECONDS
from chatkv.tui.widgets.memory_bar import MemoryBar
from chatkv.tui.widgets.number_format import (
    NO_VALUE,
    format_average,
    format_bytes,
    format_count,
    format_ms,
    format_percent,
    format_quantity,
    format_rate,
)
from chatkv.visible_text import visible

LABEL_WIDTH = 10
"""Labels are padded to one width so the values line up in a column."""

Line = tuple[str, str]
"""One row of a section: its label and its value, both plain text."""


def hit_rate_lines(stats: EngineStats) -> list[Line]:
    # Before any prompt the hit rate is undefined, not zero: show a dash rather than an alarming 0.0%.
    measured = stats.prompt_tokens > 0
    window = format_percent(stats.hit_rate_window if measured else None)
    overall = format_percent(stats.hit_rate if measured else None)
    return [
        ("hit rate", f"{window} recent · {overall} all"),
        ("reused", f"{format_count(stats.reused_tokens)} of {format_count(stats.prompt_tokens)} tok"),
        ("hits", f"{format_count(stats.turn_hits)} of {format_quantity(stats.turns, 'turn')}"),
        ("evicted", format_quantity(stats.evictions, "session")),
        ("", f"{format_count(stats.evicted_tokens)} tok · {format_bytes(stats.evicted_bytes)}"),
    ]


def memory_lines(stats: EngineStats) -> list[Line]:
    # "reserved" is what the budget and the bar count: each session holds room ahead of its tokens, so a short
    # chat reserves far more than its tokens use.
    budget = f"of {format_bytes(stats.budget_bytes)}" if stats.budget_bytes > 0 else "(no budget)"
    return [
        ("used", f"{format_bytes(stats.used_bytes)} by {format_count(stats.tokens)} tok"),
        ("reserved", f"{format_bytes(stats.bytes)} {budget}"),
        ("peak", format_bytes(stats.peak_bytes)),
        ("resident", format_quantity(stats.sessions, "session")),
    ] + ([("shared", f"{format_quantity(stats.shared_blocks, 'block')} · {format_bytes(stats.shared_bytes_saved)} saved")]
         if stats.shared_blocks else [])  # blocks held by several sessions (forks, common prefixes), held once


RATE_WINDOW = f"last {WINDOW_SECONDS:g} s"


def _live_rate(stats: EngineStats, tokens_per_second: float) -> str:
    # A rolling rate is only meaningful while turns run; once idle it would mix the end of one reply with
    # silence, so the panel says idle instead (each reply's own rate is in its footer and under "This tab").
    if stats.active_turns == 0:
        return "idle"
    return f"{format_rate(tokens_per_second)} · {RATE_WINDOW}"


def decode_lines(stats: EngineStats) -> list[Line]:
    # The sparkline below this line is Textual's: it scales between the lowest and highest recent rate, so it
    # shows the shape of throughput over time while this figure gives its level.
    lines = [("decode", _live_rate(stats, stats.decode_tok_s))]
    if stats.threads:  # the local engine: how many threads compute, with which weights (a server does not say)
        lines.append(("engine", f"{format_quantity(stats.threads, 'thread')} · {stats.weights or NO_VALUE}"))
        lines.append(("drafts", _draft_line(stats)))
    return lines


def _draft_line(stats: EngineStats) -> str:
    # speculative decoding: of the tokens guessed from the conversation, the share the model agreed with
    if not stats.draft_tokens:
        return "off"
    if not stats.drafted_tokens:
        return f"up to {stats.draft_tokens} · none yet"
    return f"{stats.draft_acceptance_rate:.0%} of {format_count(stats.drafted_tokens)} accepted"


def prefill_lines(stats: EngineStats) -> list[Line]:
    # The first turn has a TTFT as soon as its first token is out, before it counts as a finished turn.
    ttft = format_ms(stats.last_ttft_ms) if stats.turns > 0 or stats.last_ttft_ms > 0 else NO_VALUE
    return [
        ("prefill", _live_rate(stats, stats.prefill_tok_s)),
        ("TTFT", f"{ttft} last turn"),
        ("generated", f"{format_count(stats.generated_tokens)} tok"),
    ]


def batching_lines(stats: EngineStats) -> list[Line]:
    return [
        ("batch", f"{format_average(stats.avg_batch_size)} avg · wait {format_ms(stats.avg_batch_wait_ms)}"),
        ("queue", f"{format_count(stats.queue_depth)} now · {format_average(stats.avg_queue_depth)} avg"),
        ("running", f"{format_quantity(stats.active_turns, 'turn')} · {format_count(stats.rejected_requests)} refused"),
        ("forwards", format_count(stats.forward_passes)),
    ]


def snapshot_lines(stats: EngineStats, ready_tabs: int = 0) -> list[Line]:
    """``ready_tabs``: open tabs whose KV is on disk only, to be restored by their next turn."""
    budget = f" of {format_bytes(stats.disk_budget_bytes)}" if stats.disk_budget_bytes > 0 else ""
    return [
        ("restores", f"{format_count(stats.disk_restores)} · {format_count(stats.disk_reused_tokens)} tok"),
        ("ready", f"{format_quantity(ready_tabs, 'tab')} on disk"),
        ("on disk", f"{format_bytes(stats.disk_bytes)}{budget}"),
    ]


def session_lines(session: SessionStats | None, last_reply: dict | None = None) -> list[Line]:
    """``last_reply``: the figures of the tab's newest reply (a saved message's ``stats``), if it has one."""
    reply = NO_VALUE
    if last_reply and last_reply.get("decode_tok_s") is not None:
        reply = f"{format_rate(last_reply['decode_tok_s'])} · {format_count(last_reply.get('new_tokens', 0))} tok"
    if session is None:
        return [("cached", NO_VALUE), ("where", NO_VALUE), ("reply", reply)]
    if session.resident:
        where = "memory"
    elif session.on_disk_bytes > 0:
        where = f"ready on disk · {format_bytes(session.on_disk_bytes)}"
    else:
        where = "not cached"
    return [
        ("cached", f"{format_count(session.tokens)} tok · {format_bytes(session.bytes)}"),
        ("where", where),
        ("reply", reply),
    ]


NOT_REPORTED = "not reported"
"""Shown for a figure the remote server does not give: chatkv never stands in a guess for it."""


def _reported(value, formatter) -> str:
    return NOT_REPORTED if value is None else formatter(value)


def server_reuse_lines(stats: EngineStats) -> list[Line]:
    """A remote server: reuse as the server reported it per turn (turns where it reported nothing are left out)."""
    if stats.prompt_tokens <= 0:
        value = NOT_REPORTED if stats.turns else NO_VALUE
        return [("hit rate", value), ("reused", value), ("turns", format_count(stats.turns))]
    return [
        ("hit rate", f"{format_percent(stats.hit_rate_window)} recent · {format_percent(stats.hit_rate)} all"),
        ("reused", f"{format_count(stats.reused_tokens)} of {format_count(stats.prompt_tokens)} tok"),
        ("hits", f"{format_count(stats.turn_hits)} of {format_quantity(stats.turns, 'turn')}"),
    ]


def server_lines(report) -> list[Line]:
    """The server's own /metrics (``chatkv.remote.server_metrics.ServerReport``), 'not reported' where it says nothing."""
    def count(value: float) -> str:  # Prometheus values are floats, these are whole numbers of tokens or requests
        return format_count(int(value))

    return [
        ("server", report.kind if report.scrape_error is None else f"{report.kind} · {report.scrape_error}"),
        ("hit rate", _reported(report.cache_hit_rate, format_percent)),
        ("cached", NOT_REPORTED if report.cached_prompt_tokens is None else
         f"{count(report.cached_prompt_tokens)} of {_reported(report.prompt_tokens, count)} tok"),
        ("KV used", _reported(report.kv_usage, format_percent)),
        ("requests", NOT_REPORTED if report.requests_running is None else
         f"{count(report.requests_running)} running · {_reported(report.requests_waiting, count)} waiting"),
    ]


def server_session_lines(session: SessionStats | None) -> list[Line]:
    if session is None:
        return [("model", NO_VALUE), ("slot", NO_VALUE), ("cached", NO_VALUE)]
    if session.server_prompt_tokens is None:
        cached = NO_VALUE if session.server_cached_tokens is None else f"{format_count(session.server_cached_tokens)} tok"
    else:
        cached = f"{_reported(session.server_cached_tokens, format_count)} of {format_count(session.server_prompt_tokens)} tok"
    return [
        ("model", session.model or NO_VALUE),
        ("slot", NO_VALUE if session.slot is None else str(session.slot)),
        ("cached", f"{cached} last turn"),
    ]


def render_lines(lines: Sequence[Line]) -> Content:
    """Muted labels in a padded column, values in the normal text colour."""
    parts: list[str | tuple[str, str]] = []
    for index, (label, value) in enumerate(lines):
        if index:
            parts.append("\n")
        parts.append((label.ljust(LABEL_WIDTH), "$foreground-muted"))
        parts.append(visible(value, one_line=True))  # model and server names come from outside
    return Content.assemble(*parts)


class StatsSection(Static):
    """A block of label/value rows; ``show`` repaints only when the rows differ from what is on screen."""

    def __init__(self, *, id: str) -> None:
        super().__init__(id=id, markup=False)
        self.lines: list[Line] = []

    def show(self, lines: list[Line]) -> None:
        if lines == self.lines:
            return
        # The number of rows is fixed per section, so the height never changes and no layout pass is needed.
        needs_layout = len(lines) != len(self.lines)
        self.lines = lines
        self.update(render_lines(lines), layout=needs_layout)


class StatsPanel(Widget, can_focus=False):
    """Live engine figures: cache reuse, KV memory, throughput, batching, snapshots and the current tab."""

    DEFAULT_CSS = """
    StatsPanel {
        width: 40;
        height: 1fr;
        layout: vertical;
        overflow-y: auto;
        padding: 0 1;
        background: $panel;
        & > .stats-heading {
            width: 1fr;
            margin-top: 1;
            color: $accent;
            text-style: bold;
        }
        & > StatsSection {
            width: 1fr;
            /* one row per line at any width: a long value is cut with "…", never wrapped onto a new row */
            text-wrap: nowrap;
            text-overflow: ellipsis;
        }
        & > #decode-history {
            height: 2;
            margin-left: 10;
        }
    }
    """

    def __init__(self, *, id: str | None = "stats-panel", classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        # Held as attributes so each refresh goes straight to its widget instead of running a CSS query.
        self.hit_rate = StatsSection(id="hit-rate")
        self.memory_bar = MemoryBar(id="memory-bar")
        self.memory = StatsSection(id="memory")
        self.decode = StatsSection(id="decode")
        self.decode_sparkline = Sparkline([], id="decode-history")
        self.prefill = StatsSection(id="prefill")
        self.batching = StatsSection(id="batching")
        self.snapshots = StatsSection(id="snapshots")
        self.session = StatsSection(id="session")
        self.server = StatsSection(id="server")
        # a remote server holds the KV and batches: these local sections are hidden then, the server's shown
        self.local_only: list[Widget] = [
            Label("KV memory", classes="stats-heading"), self.memory_bar, self.memory,
            Label("Batching", classes="stats-heading"), self.batching,
            Label("Snapshots on disk", classes="stats-heading"), self.snapshots,
        ]
        self.server_heading = Label("Server (its /metrics)", classes="stats-heading")
        self.decode_history: list[float] = []
        self.show_stats(EngineStats(), None)

    def compose(self) -> ComposeResult:
        heading, memory_bar, memory, batching_heading, batching, snapshots_heading, snapshots = self.local_only
        yield Label("Cache reuse", classes="stats-heading")
        yield self.hit_rate
        yield self.server_heading
        yield self.server
        yield heading
        yield memory_bar
        yield memory
        yield Label("Throughput", classes="stats-heading")
        yield self.decode
        yield self.decode_sparkline
        yield self.prefill
        yield batching_heading
        yield batching
        yield snapshots_heading
        yield snapshots
        yield Label("This tab", classes="stats-heading")
        yield self.session

    def show_stats(self, stats: EngineStats, session: SessionStats | None, last_reply: dict | None = None,
                   ready_tabs: int = 0) -> None:
        """Show the engine's figures and, when a tab is selected, that tab's session and the figures of its last reply.

        ``ready_tabs``: open tabs whose KV waits on disk for their next turn. With a remote server
        (``stats.server`` set) the local KV, batching and snapshot sections are hidden and the server's own
        figures are shown instead.
        """
        remote = stats.server is not None
        if self.server.display != remote:
            self.server_heading.display = self.server.display = remote
            for widget in self.local_only:
                widget.display = not remote
        if remote:
            self._show_server(stats, session)
        else:
            self._show_local(stats, session, last_reply, ready_tabs)
        if stats.decode_tok_s_history != self.decode_history:
            # A copy: the engine may reuse its list, and the comparison above needs the values as shown.
            self.decode_history = list(stats.decode_tok_s_history)
            # Textual draws a single point as a full-height block, which would read as peak throughput;
            # a line needs two points to say anything, so until then the sparkline stays at its baseline.
            self.decode_sparkline.data = self.decode_history if len(self.decode_history) >= 2 else []

    def _show_local(self, stats: EngineStats, session: SessionStats | None, last_reply: dict | None,
                    ready_tabs: int) -> None:
        self.hit_rate.show(hit_rate_lines(stats))
        self.memory_bar.set_usage(stats.bytes, stats.peak_bytes, stats.budget_bytes)
        self.memory.show(memory_lines(stats))
        self.decode.show(decode_lines(stats))
        self.prefill.show(prefill_lines(stats))
        self.batching.show(batching_lines(stats))
        self.snapshots.show(snapshot_lines(stats, ready_tabs))
        self.session.show(session_lines(session, last_reply))

    def _show_server(self, stats: EngineStats, session: SessionStats | None) -> None:
        self.hit_rate.show(server_reuse_lines(stats))
        self.server.show(server_lines(stats.server))
        self.decode.show(decode_lines(stats))
        ttft = format_ms(stats.last_ttft_ms) if stats.last_ttft_ms > 0 else NO_VALUE
        self.prefill.show([("TTFT", f"{ttft} last turn"), ("generated", f"{format_count(stats.generated_tokens)} tok")])
        self.session.show(server_session_lines(session))
