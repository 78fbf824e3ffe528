"""The stats panel shows the engine's figures as given, in readable units, and refreshes without rebuilding itself."""

from __future__ import annotations

import pytest
from textual.app import App, ComposeResult
from textual.widgets import Sparkline

from chatkv.engine.api import EngineStats, SessionStats
from chatkv.tui.widgets.memory_bar import MemoryBar
from chatkv.tui.widgets.number_format import (
    format_average,
    format_bytes,
    format_count,
    format_ms,
    format_percent,
    format_quantity,
    format_rate,
)
from chatkv.tui.widgets.stats_panel import StatsPanel, StatsSection

MIB = 1024**2


def busy_stats() -> EngineStats:
    """A store in use, with every figure distinct so a value shown in the wrong place cannot go unnoticed."""
    return EngineStats(
        sessions=3, tokens=2345, bytes=200 * MIB, used_bytes=70 * MIB, peak_bytes=300 * MIB, budget_bytes=512 * MIB,
        evictions=4, evicted_tokens=1717, evicted_bytes=12 * MIB,
        prompt_tokens=10_000, reused_tokens=9_000, hit_rate=0.9, hit_rate_window=0.955, turns=12, turn_hits=10,
        disk_restores=2, disk_reused_tokens=456, disk_bytes=48 * MIB, disk_budget_bytes=2048 * MIB,
        forward_passes=1234, avg_batch_size=3.25, avg_batch_wait_ms=4.4, avg_queue_depth=0.75, queue_depth=2,
        active_turns=5, rejected_requests=1,
        decode_tok_s=123.4, prefill_tok_s=2345.6, decode_tok_s_history=[10.0, 40.0, 80.0, 123.4],
        last_ttft_ms=87.2, generated_tokens=5678,
    )


class PanelApp(App):
    def compose(self) -> ComposeResult:
        yield StatsPanel()


def section_text(panel: StatsPanel, section_id: str) -> str:
    return str(panel.query_one(f"#{section_id}", StatsSection).content)


# number formatting ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "expected"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (200 * MIB, "200 MiB"),
     (int(1.25 * 1024**3), "1.2 GiB"), (3 * 1024**4, "3.0 TiB"), (5000 * 1024**4, "5000 TiB")],
)
def test_format_bytes_uses_binary_units(count: int, expected: str) -> None:
    assert format_bytes(count) == expected


def test_format_other_units() -> None:
    assert format_count(12345) == "12,345"
    assert format_count(12_345_678) == "12.3M"
    assert format_rate(26.44) == "26.4 tok/s"
    assert format_rate(2345.6) == "2,346 tok/s"
    assert format_percent(0.921) == "92.1%"
    assert format_percent(None) == "–"
    assert format_ms(87.4) == "87 ms"
    assert format_ms(1250) == "1.25 s"
    assert format_average(3.254) == "3.25"
    assert format_quantity(1, "session") == "1 session"
    assert format_quantity(0, "session") == "0 sessions"
    assert format_quantity(12345, "turn") == "12,345 turns"


# the panel's content ---------------------------------------------------------------------------------------


async def test_panel_shows_every_figure_from_engine_stats() -> None:
    app = PanelApp()
    async with app.run_test(size=(50, 50)):
        panel = app.query_one(StatsPanel)
        panel.show_stats(busy_stats(), SessionStats("tab-a", tokens=456, bytes=1234567, resident=True))

        hit_rate = section_text(panel, "hit-rate")
        assert "95.5% recent · 90.0% all" in hit_rate
        assert "9,000 of 10,000 tok" in hit_rate
        assert "10 of 12 turns" in hit_rate
        assert "4 sessions" in hit_rate
        assert "1,717 tok · 12.0 MiB" in hit_rate

        memory = section_text(panel, "memory")
        assert "used      70.0 MiB by 2,345 tok" in memory
        assert "reserved  200 MiB of 512 MiB" in memory
        assert "peak      300 MiB" in memory
        assert "resident  3 sessions" in memory

        assert "123 tok/s · last 10 s" in section_text(panel, "decode")
        prefill = section_text(panel, "prefill")
        assert "2,346 tok/s · last 10 s" in prefill
        assert "87 ms last turn" in prefill
        assert "5,678 tok" in prefill

        batching = section_text(panel, "batching")
        assert "3.25 avg · wait 4 ms" in batching
        assert "2 now · 0.75 avg" in batching
        assert "5 turns · 1 refused" in batching
        assert "forwards  1,234" in batching

        snapshots = section_text(panel, "snapshots")
        assert "2 · 456 tok" in snapshots
        assert "ready     0 tabs on disk" in snapshots
        assert "48.0 MiB of 2.0 GiB" in snapshots

        session = section_text(panel, "session")
        assert "456 tok · 1.2 MiB" in session
        assert "where     memory" in session

        assert list(panel.query_one("#decode-history", Sparkline).data) == [10.0, 40.0, 80.0, 123.4]
        bar = panel.query_one(MemoryBar)
        assert (bar.current_bytes, bar.peak_bytes, bar.budget_bytes) == (200 * MIB, 300 * MIB, 512 * MIB)


async def test_undefined_figures_show_a_dash_not_zero() -> None:
    app = PanelApp()
    async with app.run_test(size=(50, 50)):
        panel = app.query_one(StatsPanel)
        panel.show_stats(EngineStats(), None)
        assert "– recent · – all" in section_text(panel, "hit-rate")
        assert "– last turn" in section_text(panel, "prefill")
        assert "(no budget)" in section_text(panel, "memory")
        assert section_text(panel, "session") == "cached    –\nwhere     –\nreply     –"


async def test_idle_rates_say_idle_instead_of_a_stale_figure_and_the_tab_shows_its_last_reply() -> None:
    app = PanelApp()
    async with app.run_test(size=(50, 50)):
        panel = app.query_one(StatsPanel)
        idle = EngineStats(decode_tok_s=21.4, prefill_tok_s=900.0, active_turns=0, turns=3)
        panel.show_stats(idle, SessionStats("a", tokens=50, bytes=4096, resident=True),
                         last_reply={"decode_tok_s": 16.9, "new_tokens": 42}, ready_tabs=1)
        assert section_text(panel, "decode") == "decode    idle"
        assert section_text(panel, "prefill").startswith("prefill   idle")
        assert section_text(panel, "session").endswith("reply     16.9 tok/s · 42 tok")
        assert "ready     1 tab on disk" in section_text(panel, "snapshots")


async def test_ttft_of_the_first_turn_shows_before_the_turn_ends() -> None:
    app = PanelApp()
    async with app.run_test(size=(50, 50)):
        panel = app.query_one(StatsPanel)
        panel.show_stats(EngineStats(turns=0, last_ttft_ms=312.0), None)
        assert "312 ms last turn" in section_text(panel, "prefill")


@pytest.mark.parametrize(
    ("session", "where"),
    [
        (SessionStats("a", tokens=10, bytes=2048, resident=True, on_disk_bytes=4096), "memory"),
        (SessionStats("a", tokens=10, bytes=0, resident=False, on_disk_bytes=3 * MIB), "ready on disk · 3.0 MiB"),
        (SessionStats("a", tokens=0, bytes=0, resident=False), "not cached"),
    ],
)
async def test_session_detail_says_where_the_cache_is(session: SessionStats, where: str) -> None:
    app = PanelApp()
    async with app.run_test(size=(50, 50)):
        panel = app.query_one(StatsPanel)
        panel.show_stats(busy_stats(), session)
        assert f"where     {where}\n" in section_text(panel, "session")


# refreshing cheaply ---------------------------------------------------------------------------------------


async def test_updates_reuse_the_same_widgets() -> None:
    app = PanelApp()
    async with app.run_test(size=(50, 50)) as pilot:
        panel = app.query_one(StatsPanel)
        widgets_before = list(panel.walk_children())
        for step in range(20):
            stats = busy_stats()
            stats.tokens += step
            stats.decode_tok_s_history = [float(step)] * (step + 1)
            panel.show_stats(stats, SessionStats("a", tokens=step, bytes=step * 1024, resident=step % 2 == 0))
            await pilot.pause()
        assert list(panel.walk_children()) == widgets_before
        assert f"{2345 + 19:,} tok" in section_text(panel, "memory")


async def test_unchanged_figures_do_not_repaint(monkeypatch: pytest.MonkeyPatch) -> None:
    app = PanelApp()
    async with app.run_test(size=(50, 50)) as pilot:
        panel = app.query_one(StatsPanel)
        panel.show_stats(busy_stats(), None)
        await pilot.pause()

        repainted: list[str] = []
        original_update = StatsSection.update

        def counting_update(self: StatsSection, *args, **kwargs) -> None:
            repainted.append(self.id or "")
            original_update(self, *args, **kwargs)

        monkeypatch.setattr(StatsSection, "update", counting_update)
        bar_refreshes: list[None] = []
        monkeypatch.setattr(panel.memory_bar, "refresh", lambda *a, **k: bar_refreshes.append(None))

        panel.show_stats(busy_stats(), None)  # equal figures in a new object
        assert repainted == [] and bar_refreshes == []

        changed = busy_stats()
        changed.queue_depth = 7
        panel.show_stats(changed, None)
        assert repainted == ["batching"] and bar_refreshes == []


class NarrowPanelApp(App):
    CSS = "StatsPanel { width: 24; }"

    def compose(self) -> ComposeResult:
        yield StatsPanel()


async def test_long_values_in_a_narrow_panel_keep_one_row_per_line() -> None:
    app = NarrowPanelApp()
    async with app.run_test(size=(40, 60)) as pilot:
        panel = app.query_one(StatsPanel)
        panel.show_stats(busy_stats(), None)
        await pilot.pause()
        for section in panel.query(StatsSection):
            assert section.size.height == len(section.lines), section.id


async def test_sparkline_keeps_its_own_copy_of_the_history() -> None:
    app = PanelApp()
    async with app.run_test(size=(50, 50)):
        panel = app.query_one(StatsPanel)
        stats = busy_stats()
        panel.show_stats(stats, None)
        stats.decode_tok_s_history.append(999.0)  # the engine reusing its list must not change what is shown
        assert list(panel.decode_sparkline.data) == [10.0, 40.0, 80.0, 123.4]
        panel.show_stats(stats, None)
        assert list(panel.decode_sparkline.data)[-1] == 999.0


async def test_a_single_throughput_sample_is_not_drawn_as_a_full_bar() -> None:
    app = PanelApp()
    async with app.run_test(size=(50, 50)):
        panel = app.query_one(StatsPanel)
        stats = busy_stats()
        stats.decode_tok_s_history = [0.0]
        panel.show_stats(stats, None)
        assert list(panel.decode_sparkline.data) == []
        stats.decode_tok_s_history = [0.0, 12.5]
        panel.show_stats(stats, None)
        assert list(panel.decode_sparkline.data) == [0.0, 12.5]


def test_panel_accepts_stats_before_it_is_mounted() -> None:
    panel = StatsPanel()
    panel.show_stats(busy_stats(), None)
    assert "200 MiB of 512 MiB" in str(panel.memory.content)


# the memory bar --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "peak", "budget", "cells"),
    [
        (0, 0, 0, (0, None)),  # no budget: nothing to measure against
        (0, 0, 100, (0, None)),
        (50, 50, 100, (10, None)),  # peak equal to current sits on the used part
        (50, 80, 100, (10, 15)),
        (25, 100, 100, (5, 19)),
        (120, 150, 100, (20, None)),  # over budget: full bar, peak pinned inside it
    ],
)
def test_memory_bar_cells(current: int, peak: int, budget: int, cells: tuple[int, int | None]) -> None:
    bar = MemoryBar()
    bar.set_usage(current, peak, budget)
    assert bar.cells(20) == cells


async def test_decode_section_says_how_many_threads_and_which_weights_the_engine_uses() -> None:
    app = PanelApp()
    async with app.run_test(size=(50, 50)):
        panel = app.query_one(StatsPanel)
        panel.show_stats(EngineStats(threads=1, weights="bfloat16+int4"), None)
        assert "1 thread · bfloat16+int4" in section_text(panel, "decode")
        panel.show_stats(EngineStats(threads=3, weights="float32"), None)
        assert "3 threads · float32" in section_text(panel, "decode")


async def test_decode_section_says_how_many_guessed_tokens_the_model_accepted() -> None:
    app = PanelApp()
    async with app.run_test(size=(50, 50)):
        panel = app.query_one(StatsPanel)
        panel.show_stats(EngineStats(threads=1, draft_tokens=0), None)
        assert "drafts off" in " ".join(section_text(panel, "decode").split())
        panel.show_stats(EngineStats(threads=1, draft_tokens=3), None)
        assert "up to 3 · none yet" in section_text(panel, "decode")
        panel.show_stats(EngineStats(threads=1, draft_tokens=3, drafted_tokens=1200, accepted_draft_tokens=900,
                                     draft_acceptance_rate=0.75), None)
        assert "75% of 1,200 accepted" in section_text(panel, "decode")
