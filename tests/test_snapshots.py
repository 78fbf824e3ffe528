"""What the user sees, compared with stored SVG snapshots (pytest-textual-snapshot).

Every screen here is deterministic: fixed terminal sizes, fixed engine figures, no clock in the header, and
the text cursor set not to blink. After a deliberate change to the look, regenerate the snapshots with
``pytest tests/test_snapshots.py --snapshot-update`` and review the SVG diffs before committing them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.app import App, ComposeResult
from textual.containers import Horizontal, Vertical
from textual.pilot import Pilot
from textual.widgets import Button, Footer, Header, Input, Markdown, TabbedContent, TabPane, TextArea

from chatkv.config import Settings
from chatkv.engine.api import EngineStats, SessionStats, TurnResult
from chatkv.paths import Paths
from chatkv.store import ConversationStore
from chatkv.tui.app import AppOptions, make_app
from chatkv.tui.themes import builtin_themes_dir, load_themes
from chatkv.tui.widgets.stats_panel import StatsPanel
from stand_in_engine import StandInEngine

MIB = 1024**2
SHIPPED_THEMES = sorted(theme.name for theme in load_themes(builtin_themes_dir(), None)[0])


def busy_engine_stats() -> EngineStats:
    """Two tabs decoding together after a few turns: the figures a user would see mid-conversation."""
    return EngineStats(
        sessions=2, tokens=1480, bytes=33 * MIB, used_bytes=21 * MIB, peak_bytes=41 * MIB, budget_bytes=64 * MIB,
        evictions=1, evicted_tokens=612, evicted_bytes=14 * MIB,
        prompt_tokens=2210, reused_tokens=1835, hit_rate=1835 / 2210, hit_rate_window=0.912, turns=6, turn_hits=4,
        disk_restores=1, disk_reused_tokens=402, disk_bytes=9 * MIB, disk_budget_bytes=2048 * MIB,
        forward_passes=318, avg_batch_size=1.84, avg_batch_wait_ms=3.2, avg_queue_depth=0.41, queue_depth=0,
        active_turns=2, rejected_requests=0,
        decode_tok_s=51.7, prefill_tok_s=1893.0,
        decode_tok_s_history=[24.1, 25.3, 26.0, 38.2, 47.5, 50.9, 51.2, 51.7, 49.8, 51.7],
        last_ttft_ms=142.0, generated_tokens=905, prefilled_tokens=375,
    )


def nearly_full_engine_stats() -> EngineStats:
    """A store at 94% of its budget: the memory bar turns to the warning colour."""
    stats = busy_engine_stats()
    stats.bytes, stats.peak_bytes = 60 * MIB, 63 * MIB
    return stats


TAB_SESSION = SessionStats("snapshot-tab", tokens=742, bytes=16 * MIB + 512 * 1024, resident=True, on_disk_bytes=0)


def register_shipped_themes(app: App) -> None:
    themes, problems = load_themes(builtin_themes_dir(), None)
    assert problems == []
    for theme in themes:
        app.register_theme(theme)


class PanelApp(App):
    """The stats panel on its own, showing fixed figures."""

    def __init__(self, stats: EngineStats, session: SessionStats | None) -> None:
        super().__init__()
        self.stats = stats
        self.session = session

    def compose(self) -> ComposeResult:
        yield StatsPanel()

    def on_mount(self) -> None:
        register_shipped_themes(self)
        self.theme = "chatkv-dark"
        self.query_one(StatsPanel).show_stats(self.stats, self.session)


SAMPLE_REPLY = """\
KV reuse keeps the **attention keys and values** of every earlier token, so a new turn only
prefills what is new:

- turn 1: 124 tokens prefilled
- turn 2: *124 reused*, 31 prefilled
"""


class ThemeSampleApp(App):
    """A small screen with the widgets chatkv uses, to compare how each theme colours them."""

    CSS = """
    #sample-chat { width: 1fr; }
    #sample-buttons { height: auto; }
    """

    def __init__(self, theme_name: str) -> None:
        super().__init__()
        self.sample_theme = theme_name

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal():
            with Vertical(id="sample-chat"):
                with TabbedContent():
                    with TabPane("research"):
                        yield Markdown(SAMPLE_REPLY)
                    with TabPane("notes"):
                        yield Markdown("Nothing here yet.")
                yield TextArea("How much of the prompt came from the cache?", id="sample-prompt")
                yield Input(placeholder="tab name")
                with Horizontal(id="sample-buttons"):
                    yield Button("Send", variant="primary")
                    yield Button("Stop", variant="error")
                    yield Button("Close")
            yield StatsPanel()
        yield Footer()

    def on_mount(self) -> None:
        register_shipped_themes(self)
        self.theme = self.sample_theme
        self.query_one(StatsPanel).show_stats(busy_engine_stats(), TAB_SESSION)
        self.query_one("#sample-prompt", TextArea).cursor_blink = False
        self.notify("1 theme file was skipped: see the log", title="Themes", timeout=600)


def test_stats_panel_snapshot(snap_compare) -> None:
    assert snap_compare(PanelApp(busy_engine_stats(), TAB_SESSION), terminal_size=(42, 38))


def test_stats_panel_nearly_full_snapshot(snap_compare) -> None:
    assert snap_compare(PanelApp(nearly_full_engine_stats(), None), terminal_size=(42, 38))


def test_stats_panel_before_any_turn_snapshot(snap_compare) -> None:
    assert snap_compare(PanelApp(EngineStats(budget_bytes=64 * MIB), None), terminal_size=(42, 38))


@pytest.mark.parametrize("theme_name", SHIPPED_THEMES)
def test_theme_snapshot(snap_compare, theme_name: str) -> None:
    assert snap_compare(ThemeSampleApp(theme_name), terminal_size=(120, 40))


# the real main screen ----------------------------------------------------------------------------------------

REPLY_TOKENS = ["The ", "cache ", "keeps ", "each ", "tab's ", "keys ", "and ", "values, ", "so ", "the ",
                "next ", "turn ", "starts ", "where ", "this ", "one ", "ended."]


class FixedEngine(StandInEngine):
    """Stands in for the engine so the main screen is the same on every run: fixed replies, fixed figures."""

    def __init__(self) -> None:
        super().__init__(REPLY_TOKENS)

    def result_for(self, session_id: str) -> TurnResult:
        return TurnResult(
            session_id=session_id, reply="".join(REPLY_TOKENS), reply_ids=list(range(len(REPLY_TOKENS))),
            prompt_ids=list(range(40)), prompt_tokens=40, reused_tokens=31, reused_from="memory",
            prefilled_tokens=9, new_tokens=len(REPLY_TOKENS), ttft_ms=142.0, decode_tok_s=25.3, batch_size=2,
            finish_reason="stop",
        )

    def stats(self) -> EngineStats:
        return busy_engine_stats()

    def session_stats(self, session_id: str) -> SessionStats:
        return TAB_SESSION


async def open_two_tabs_and_send(pilot: Pilot) -> None:
    app = pilot.app
    for index, name in enumerate(("research", "notes")):
        tab = await app.open_new_conversation(name, session_id=f"snapshot-{index}")
        await pilot.pause()
        worker = tab.send("What does the KV cache keep between turns?")
        await worker.wait()
    for text_area in app.query(TextArea):
        text_area.cursor_blink = False
    await pilot.pause()


@pytest.mark.parametrize("theme_name", ["chatkv-dark", "chatkv-light"])
def test_main_screen_snapshot(snap_compare, tmp_path: Path, theme_name: str) -> None:
    paths = Paths.resolve(tmp_path / "home")
    settings = Settings()
    settings.ui.stats_panel = "show"
    options = AppOptions(restore_tabs=False, persist=False, remember_layout=False, theme=theme_name)
    app = make_app(settings, FixedEngine(), ConversationStore(paths), paths.user_themes, options)
    assert snap_compare(app, terminal_size=(140, 42), run_before=open_two_tabs_and_send)
