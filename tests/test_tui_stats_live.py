"""The stats panel of the real App shows the real engine's figures, as they are, after real turns in two tabs."""

from __future__ import annotations

import html
import re
import time
from pathlib import Path

from chatkv.config import Settings
from chatkv.engine import Engine
from chatkv.paths import Paths
from chatkv.store import ConversationStore
from chatkv.tui.app import AppOptions, make_app
from chatkv.tui.widgets.number_format import format_bytes, format_count, format_percent, format_quantity


async def wait_until(pilot, condition, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await pilot.pause(0.05)


def screen_text(app) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", app.export_screenshot())).replace("\xa0", " ")


async def test_stats_panel_numbers_match_the_engine_stats_after_turns_in_two_tabs(tiny_bundle, data_dir: Path):
    paths = Paths.resolve(data_dir)
    settings = Settings()
    settings.generation.max_new_tokens = 6
    engine = Engine(tiny_bundle, settings, snapshot_dir=paths.snapshots).start()
    try:
        app = make_app(settings, engine, ConversationStore(paths), paths.user_themes, AppOptions())
        async with app.run_test(size=(140, 60)) as pilot:
            first = app.chat_tabs.current
            second = await app.open_new_conversation("second", "")
            for tab, text in ((first, "hello"), (second, "hi there")):
                tab.send(text)
            await wait_until(pilot, lambda: not first.generating and not second.generating)
            first.send("and again")  # a second turn in one tab: some prompt tokens come from the cache
            await wait_until(pilot, lambda: not first.generating and len(first.conversation.messages) == 4)
            app.chat_tabs.activate(first)
            await pilot.pause()
            app.refresh_stats(force=True)
            await pilot.pause()
            stats = engine.stats()
            session = engine.session_stats(first.session_id)
            shown = screen_text(app)
    finally:
        engine.close()

    assert stats.turns == 3 and stats.reused_tokens > 0
    expected = [
        f"{format_percent(stats.hit_rate)} all",
        f"{format_count(stats.reused_tokens)} of {format_count(stats.prompt_tokens)} tok",
        f"{format_bytes(stats.bytes)} of {format_bytes(stats.budget_bytes)}",
        f"{format_bytes(stats.used_bytes)} by {format_count(stats.tokens)} tok",
        f"resident  {format_quantity(stats.sessions, 'session')}",
        f"{format_count(stats.generated_tokens)} tok",
        f"{stats.avg_batch_size:.2f} avg",
        f"forwards  {format_count(stats.forward_passes)}",
        f"{format_count(session.tokens)} tok · {format_bytes(session.bytes)}",
    ]
    for figure in expected:
        assert figure in shown, f"the panel does not show {figure!r}"
