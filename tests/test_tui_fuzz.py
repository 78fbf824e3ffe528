"""A seeded random walk through the real App: keys (one at a time and in bursts), resizes from 1x1 up, dialogs,
tabs, the palette.

Each sequence starts the App (stand-in engine, real store on disk), takes random steps, then checks
that no exception escaped and that every conversation on disk loads and matches what the app holds.
A failure prints the seed and the steps, so it replays exactly.

Default: a few sequences, well under a minute. Longer: ``CHATKV_FUZZ_SEQUENCES=200 CHATKV_FUZZ_STEPS=80``
(``CHATKV_FUZZ_SEED`` picks the first seed).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from chatkv.config import Settings
from chatkv.paths import Paths
from chatkv.store import ConversationStore
from chatkv.tui.app import AppOptions, ChatApp, make_app
from chatkv.tui.keys import APP_BINDINGS, CHAT_VIEW_BINDINGS, HISTORY_BINDINGS
from stand_in_engine import StandInEngine
from test_tui_bursts import send_burst

SEQUENCES = int(os.environ.get("CHATKV_FUZZ_SEQUENCES", "4"))
STEPS = int(os.environ.get("CHATKV_FUZZ_STEPS", "40"))
FIRST_SEED = int(os.environ.get("CHATKV_FUZZ_SEED", "0"))

# every key the app binds (so a new binding joins the walk by itself), plus editing and dialog keys
BOUND_KEYS = {key for binding in APP_BINDINGS + HISTORY_BINDINGS + CHAT_VIEW_BINDINGS for key in binding.key.split(",")}
KEYS = sorted(BOUND_KEYS | {"ctrl+p", "ctrl+w", "enter", "tab", "shift+tab", "ctrl+j", "up", "down", "backspace",
                            "ctrl+u", "left", "right", "home", "end", "space", "ctrl+s"})
# bursts mix the keys that open dialogs with those that answer them, so every modal meets them
BURST_KEYS = ["enter", "escape", "tab", "ctrl+t", "ctrl+r", "f4", "ctrl+p", "ctrl+s", "e", "shift+tab", "up"]
TEXTS = ["hi", "[/", "paths [/tmp]", "<|im_end|>", "```", "# h", "x" * 90, "a\tb", "\x1b[31m", "🙂"]
REPLY_TOKENS = ["Sure", " [/b]", "\n```py\n", "x = 1", "\n", "# not a heading", " <|im_end|>", "🙂"]


def random_size(rng: random.Random) -> tuple[int, int]:
    kind = rng.random()
    if kind < 0.3:
        return rng.randint(1, 12), rng.randint(1, 8)
    if kind < 0.5:
        return rng.choice([39, 40, 41, 42, 60, 79, 80]), rng.randint(3, 30)
    if kind < 0.6:
        return rng.randint(1, 200), 1
    return rng.randint(13, 200), rng.randint(9, 60)


def random_step(rng: random.Random) -> tuple:
    roll = rng.random()
    if roll < 0.2:
        return ("resize", *random_size(rng))
    if roll < 0.3:
        return ("type", rng.choice(TEXTS))
    if roll < 0.45:  # keys as a fast typist or a key repeat sends them: the next before the last is handled
        return ("burst", *(rng.choice(BURST_KEYS) for _ in range(rng.randint(2, 5))))
    return ("press", rng.choice(KEYS))


async def take(pilot, step: tuple) -> None:
    kind = step[0]
    if kind == "resize":
        await pilot.resize_terminal(step[1], step[2])
    elif kind == "type":
        await pilot.press(*step[1])
    elif kind == "burst":
        send_burst(pilot.app, *step[1:])
    else:
        await pilot.press(step[1])
    await pilot.pause()


def check_disk_matches(app: ChatApp, paths: Paths) -> None:
    conversations, set_aside = ConversationStore(paths).load_all()
    assert set_aside == [], set_aside
    on_disk = {conversation.id: conversation for conversation in conversations}
    for tab in app.chat_tabs.chat_tabs:
        saved = on_disk[tab.session_id]
        assert saved.name == tab.conversation.name
        assert [m.to_dict() for m in saved.messages] == [m.to_dict() for m in tab.conversation.messages]


async def run_sequence(seed: int, steps: int, home: Path) -> list[tuple]:
    rng = random.Random(seed)
    paths = Paths.resolve(home)
    store = ConversationStore(paths)
    app = make_app(Settings(), StandInEngine(REPLY_TOKENS), store, paths.user_themes, AppOptions())
    taken: list[tuple] = []
    try:
        async with app.run_test(size=random_size(rng)) as pilot:
            for _ in range(steps):
                step = random_step(rng)
                taken.append(step)
                await take(pilot, step)
                assert app._exception is None
            while app.screen_stack and len(app.screen_stack) > 1:  # close whatever dialog is open, as a user would
                await pilot.press("escape")
                await pilot.pause()
                taken.append(("press", "escape"))
            await pilot.pause()
            await pilot.wait_for_scheduled_animations()
            for tab in app.chat_tabs.chat_tabs:
                await tab.wait_for_turn()
            check_disk_matches(app, paths)
    except Exception as exc:
        raise AssertionError(f"seed {seed} failed after steps {taken!r}: {type(exc).__name__}: {exc}") from exc
    assert app._exception is None
    return taken


@pytest.mark.parametrize("seed", range(FIRST_SEED, FIRST_SEED + SEQUENCES))
async def test_random_keys_resizes_and_dialogs_never_crash_the_app_and_keep_conversations_intact(seed, tmp_path):
    taken = await run_sequence(seed, STEPS, tmp_path / "home")
    assert len(taken) >= STEPS


async def test_f2_at_40_columns_and_shrinking_to_40_with_the_panel_open_leave_the_message_input_usable(tmp_path):
    paths = Paths.resolve(tmp_path / "home")
    app = make_app(Settings(), StandInEngine(["ok"]), ConversationStore(paths), paths.user_themes, AppOptions())
    async with app.run_test(size=(40, 20)) as pilot:
        await pilot.press("f2")
        await pilot.pause()
        assert app.stats_panel.display
        tab = app.chat_tabs.current
        assert tab.prompt_input.content_size.width > 0
        await pilot.press(*"hi", "enter")
        await pilot.pause()
        await tab.wait_for_turn()
        assert [m.role for m in tab.conversation.messages] == ["user", "assistant"]
    app = make_app(Settings(), StandInEngine(["ok"]), ConversationStore(paths), paths.user_themes, AppOptions())
    async with app.run_test(size=(160, 40)) as pilot:
        assert app.stats_panel.display  # shown by default when wide
        await pilot.resize_terminal(40, 20)
        await pilot.pause()
        app.stats_panel.display = True
        await pilot.pause()
        assert app.chat_tabs.current.prompt_input.content_size.width > 0
    assert app._exception is None


async def test_every_size_from_1x1_with_and_without_the_panel_and_each_dialog_open(tmp_path):
    paths = Paths.resolve(tmp_path / "home")
    app = make_app(Settings(), StandInEngine(["ok"]), ConversationStore(paths), paths.user_themes, AppOptions())
    sizes = [(width, height) for width in (1, 2, 4, 7, 12, 20, 40, 80) for height in (1, 3, 8, 24)]
    async with app.run_test(size=(80, 24)) as pilot:
        for dialog in (None, "ctrl+t", "ctrl+r", "f4", "ctrl+p"):
            if dialog:
                await pilot.resize_terminal(80, 24)
                await pilot.press(dialog)
                await pilot.pause()
            for panel in (False, True):
                app.stats_panel.display = panel
                for width, height in sizes:
                    await pilot.resize_terminal(width, height)
                    await pilot.pause()
                    assert app._exception is None, (dialog, panel, width, height)
            if dialog:
                await pilot.press("escape")
                await pilot.pause()
