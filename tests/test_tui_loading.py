"""The terminal UI shows at once and loads the model behind it (``LoadingEngine``): saved chats can be read
while it loads, a message sent meanwhile goes once it is ready, and a failed load is shown, not a crash.

The model load is a stand-in that waits for the test (the stand-in engine replies): what matters here is
what the app does around the load, not the model.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from chatkv.config import Settings
from chatkv.conversation import Message
from chatkv.model.errors import ModelError
from chatkv.paths import Paths
from chatkv.runtime import LoadingEngine
from chatkv.store import ConversationStore
from chatkv.tui.launch import EngineNotes
from chatkv.tui.app import AppOptions, make_app
from stand_in_engine import StandInEngine
from test_tui_app import SIZE, screen_text, wait_until


@pytest.fixture
def store(data_dir: Path) -> ConversationStore:
    return ConversationStore(Paths.resolve(data_dir))


def held_load(release: threading.Event, result):
    def load(supervisor):
        release.wait(30)
        if isinstance(result, Exception):
            raise result
        return result
    return load


def loading_app(store: ConversationStore, result):
    """The App behind a ``LoadingEngine`` whose load waits for ``release`` and then gives ``result`` (or raises it),
    wired as ``chatkv launch`` wires it; returns (app, engine, release)."""
    release = threading.Event()
    notes = EngineNotes()
    engine = LoadingEngine(held_load(release, result), notes.loaded)
    app = notes.app = make_app(Settings(), engine, store, None, AppOptions(on_shown=engine.start))
    return app, engine, release


async def send_while_loading(pilot, tab, text: str) -> None:
    tab.prompt_input.load_text(text)
    await pilot.press("enter")
    await wait_until(pilot, lambda: tab.waiting_for_model)


async def test_saved_chats_show_while_the_model_loads_and_a_message_sent_meanwhile_goes_once_it_is_ready(store):
    conversation = store.new_conversation("earlier", "")
    conversation.messages += [Message("user", "What is tmux?"), Message("assistant", "A terminal multiplexer.", [1])]
    store.save(conversation)
    store.save_state({"open_tabs": [conversation.id], "active_tab": conversation.id, "theme": "chatkv-dark"})
    app, engine, release = loading_app(store, StandInEngine(["It splits terminals."]))
    try:
        async with app.run_test(size=SIZE) as pilot:
            assert "A terminal multiplexer." in screen_text(app)  # readable before the model is there
            tab = app.chat_tabs.current
            tab.prompt_input.load_text("And screen?")
            await pilot.press("enter")
            await pilot.pause(0.2)
            assert tab.generating and len(tab.conversation.messages) == 3  # waiting for the model, not refused
            release.set()
            await wait_until(pilot, lambda: not tab.generating)
            assert tab.conversation.messages[-1].content == "It splits terminals."
    finally:
        release.set()
        engine.close()


async def test_a_model_that_fails_to_load_is_reported_and_the_message_is_handed_back(store):
    app, engine, release = loading_app(store, ModelError("No such GGUF file: /nope.gguf"))
    try:
        async with app.run_test(size=SIZE) as pilot:
            tab = app.chat_tabs.current
            release.set()
            await wait_until(pilot, lambda: not engine.loading)
            await pilot.pause(0.1)
            assert "did not load" in app.sub_title
            tab.prompt_input.load_text("hello?")
            await pilot.press("enter")
            await wait_until(pilot, lambda: not tab.generating)
            assert tab.prompt_input.text == "hello?" and tab.conversation.messages == []
            assert "No such GGUF file" in screen_text(app)
    finally:
        release.set()
        engine.close()


async def test_engine_notes_and_progress_reach_the_app_before_it_runs_while_it_loads_and_after_it_quits(store, capsys):
    # What a machine's first launch does: the engine builds its kernels and quantizes the model while the app
    # runs, and says so from its own threads. The first message is typed before the model is ready.
    release = threading.Event()
    notes = EngineNotes()

    def load(supervisor):
        notes("compiling chatkv's CPU kernels (once per machine, up to a minute)…")
        notes.progress("Quantizing SmolLM2-135M-Instruct to int4 (once)…")
        release.wait(30)
        return StandInEngine(["Hello there."])

    engine = LoadingEngine(load, notes.loaded)
    app = notes.app = make_app(Settings(), engine, store, None, AppOptions(on_shown=engine.start))
    notes("a note sent before the app runs")
    try:
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: "Quantizing" in app.sub_title)
            notes_shown = [notification.message for notification in app._notifications]
            assert notes_shown[-2:] == ["a note sent before the app runs",
                                        "compiling chatkv's CPU kernels (once per machine, up to a minute)…"]
            tab = app.chat_tabs.current
            tab.prompt_input.load_text("Hi?")
            await pilot.press("enter")
            release.set()
            await wait_until(pilot, lambda: not tab.generating)
            assert tab.conversation.messages[-1].content == "Hello there."
            assert "did not load" not in app.sub_title
    finally:
        release.set()
        engine.close()
    notes("a note sent after the app quit")  # the engine writes snapshots after the app has gone
    assert "chatkv: a note sent after the app quit" in capsys.readouterr().err


async def test_esc_while_the_message_waits_for_the_model_hands_it_back_and_nothing_is_sent_later(store):
    release = threading.Event()
    notes = EngineNotes()
    model = StandInEngine(["Too late."])
    engine = LoadingEngine(held_load(release, model), notes.loaded)
    app = notes.app = make_app(Settings(), engine, store, None, AppOptions(on_shown=engine.start))
    try:
        async with app.run_test(size=SIZE) as pilot:
            tab = app.chat_tabs.current
            await send_while_loading(pilot, tab, "Are you there?")
            await pilot.press("escape")
            await wait_until(pilot, lambda: not tab.generating)
            assert [n.message for n in app._notifications][-1] == "Stopping the reply; what was written is kept."
            assert tab.conversation.messages == [] and tab.prompt_input.text == "Are you there?"
            assert "your message is back in the box" in " ".join(screen_text(app).split())
            release.set()
            await wait_until(pilot, lambda: not engine.loading)
            await pilot.pause(0.2)
            assert model.prompts == []  # the stopped message never reached the model
    finally:
        release.set()
        engine.close()
    assert store.get(tab.session_id).messages == []


async def test_quitting_while_the_message_waits_for_the_model_keeps_it_saved_and_does_not_wait(store):
    app, engine, release = loading_app(store, StandInEngine(["Hi."]))
    try:
        async with app.run_test(size=SIZE) as pilot:
            tab = app.chat_tabs.current
            await send_while_loading(pilot, tab, "Remember this question.")
            started = time.monotonic()
            await pilot.press("ctrl+q")
            await wait_until(pilot, lambda: not app.is_running, timeout=10)
            # no reply to stop or wait for: a running one would get up to 5 s to end
            assert time.monotonic() - started < 4.5
    finally:
        release.set()
        engine.close()
    saved = store.get(tab.session_id).messages
    assert [(m.role, m.content) for m in saved] == [("user", "Remember this question.")]


def test_closing_during_the_load_aborts_an_engine_that_can_abort_and_reports_nothing() -> None:
    class SlowStart:
        def __init__(self) -> None:
            self.aborted = threading.Event()

        def abort(self) -> None:
            self.aborted.set()

        def start(self):
            if self.aborted.wait(30):
                raise ModelError("the model could not be loaded: the engine process ended (killed)")
            return StandInEngine()

    starting = SlowStart()
    reported: list[str | None] = []

    def load(supervisor):
        supervisor.starting(starting)
        return starting.start()

    engine = LoadingEngine(load, reported.append).start()
    time.sleep(0.1)
    began = time.monotonic()
    engine.close()
    assert starting.aborted.is_set() and time.monotonic() - began < 5
    assert reported == []  # nobody is told of a load that was abandoned on the way out
