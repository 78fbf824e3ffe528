"""Regenerate, edit and resend, fork: headless ops with ``--trace`` on a long conversation, their KV reuse
(from the counters and from the tokens the model was fed), exactness against the full-recompute reference,
bad input, persistence, and the same actions through the real App with keys, mouse and the palette.

The headless tests run the real ``ScriptRunner`` in this process (as ``chatkv launch --headless`` does)
so that they can read ``ModelRunner.tokens_fed`` between turns.
"""

from __future__ import annotations

import io
from pathlib import Path

import orjson
import pytest

from chatkv.bench.filler import filler_message
from chatkv.config import Settings
from chatkv.conversation import ForkOrigin
from chatkv.engine import Engine
from chatkv.engine.api import EngineError
from chatkv.engine.reference import greedy_full_recompute
from chatkv.headless import EventWriter, ScriptRunner
from chatkv.headless_script import ScriptError, parse_line
from chatkv.paths import Paths
from chatkv.store import ConversationStore
from chatkv.tui.app import GREEDY_REGENERATE_NOTE, AppOptions, make_app
from chatkv.tui.screens.edit_message import EditMessageScreen
from chatkv.tui.widgets.chat_view import ChatView
from chatkv.tui.widgets.messages import UserMessage
from chatkv.tui.widgets.prompt_input import PromptInput
from chat_turns import chat
from test_tui_app import SIZE, screen_text, settings_with, type_and_send, wait_until


def test_the_three_ops_parse_with_exactly_the_documented_shapes():
    assert parse_line(b'{"op":"regenerate","tab":"a"}', 1).tab == "a"
    edit = parse_line(b'{"op":"edit","tab":"a","message":2,"text":"again"}', 1)
    assert (edit.name, edit.tab, edit.message, edit.text) == ("edit", "a", 2, "again")
    fork = parse_line(b'{"op":"fork","tab":"a","message":0,"new_tab":"b"}', 1)
    assert (fork.name, fork.tab, fork.message, fork.new_tab) == ("fork", "a", 0, "b")


@pytest.mark.parametrize("raw, complaint", [
    (b'{"op":"regenerate"}', 'needs "tab"'),
    (b'{"op":"edit","tab":"a","text":"x"}', 'needs "message"'),
    (b'{"op":"edit","tab":"a","message":-1,"text":"x"}', "at least 0"),
    (b'{"op":"edit","tab":"a","message":"2","text":"x"}', "must be an integer"),
    (b'{"op":"edit","tab":"a","message":1,"text":"  "}', '"text" is empty'),
    (b'{"op":"fork","tab":"a","message":1}', 'needs "new_tab"'),
    (b'{"op":"fork","tab":"a","message":1,"new_tab":""}', '"new_tab" must not be empty'),
])
def test_a_malformed_branching_op_says_what_is_wrong(raw, complaint):
    with pytest.raises(ScriptError) as caught:
        parse_line(raw, 4)
    assert complaint in str(caught.value) and "line 4" in str(caught.value)
    assert caught.value.tab == (None if complaint == 'needs "tab"' else "a")


class FedCountingWriter(EventWriter):
    """Records, with every turn event, how many tokens the model was fed since the previous one."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(io.StringIO())
        self.engine = engine
        self.events: list[dict] = []
        self._fed = 0

    def emit(self, event: dict) -> None:
        if event["event"] == "turn":
            fed = self.engine.runner.tokens_fed
            event = {**event, "fed": fed - self._fed}
            self._fed = fed
        self.events.append(event)


def greedy(settings: Settings) -> Settings:
    """Temperature 0: these tests compare replies with greedy recomputation (the default samples)."""
    settings.generation.temperature = 0.0
    return settings


async def run_script(bundle, data_dir: Path, lines: list[dict], settings: Settings | None = None):
    """Run a headless script in this process with ``--trace``; its events (turns carry "fed") and the engine."""
    settings = settings or greedy(Settings())
    paths = Paths.resolve(data_dir)
    engine = Engine(bundle, settings, snapshot_dir=paths.snapshots).start()
    try:
        writer = FedCountingWriter(engine)
        script = io.BytesIO(b"".join(orjson.dumps(line) + b"\n" for line in lines))
        runner = ScriptRunner(script, writer, stream_tokens=False, trace=True)
        app = make_app(settings, engine, ConversationStore(paths), paths.user_themes,
                       AppOptions(restore_tabs=False, remember_layout=False))
        await app.run_async(headless=True, auto_pilot=runner)
        return writer.events, engine
    finally:
        engine.close()


def turns_of(events: list[dict]) -> list[dict]:
    return [event for event in events if event["event"] == "turn"]


def assert_exact(bundle, engine: Engine, turn: dict) -> None:
    reference = greedy_full_recompute(bundle.model, turn["prompt_ids"], len(turn["reply_ids"]), engine.eos_ids)
    assert turn["reply_ids"] == reference


def assert_fed_only_what_was_prefilled(turn: dict) -> None:
    # a turn feeds its uncached prompt tokens, then each generated token but the last
    assert turn["fed"] == turn["prefilled_tokens"] + turn["new_tokens"] - 1


@pytest.mark.parametrize("model, filler_tokens", [
    pytest.param("tiny", 500, id="tiny-random"),
    pytest.param("real", 1460, id="smollm2", marks=pytest.mark.real_model),
])
async def test_regenerate_edit_and_fork_prefill_only_past_the_shared_prefix_and_reply_exactly(
        model, filler_tokens, request, tmp_path):
    bundle = request.getfixturevalue("real_bundle" if model == "real" else "tiny_bundle")
    long_message = filler_message(bundle.tokenizer, filler_tokens)
    edited = "Which entry is about a customer?"
    events, engine = await run_script(bundle, tmp_path / "home", [
        {"op": "open", "tab": "a", "system": "You are terse."},
        {"op": "send", "tab": "a", "text": long_message, "max_new_tokens": 4}, {"op": "wait"},
        {"op": "send", "tab": "a", "text": "Which entry is about tests?", "max_new_tokens": 4}, {"op": "wait"},
        {"op": "send", "tab": "a", "text": "And memory?", "max_new_tokens": 4}, {"op": "wait"},
        {"op": "regenerate", "tab": "a", "max_new_tokens": 4}, {"op": "wait"},
        {"op": "edit", "tab": "a", "message": 2, "text": edited, "max_new_tokens": 4}, {"op": "wait"},
        {"op": "fork", "tab": "a", "message": 3, "new_tab": "b"},
        {"op": "send", "tab": "b", "text": "One word: on-call?", "max_new_tokens": 4}, {"op": "wait"},
    ])
    assert [event for event in events if event["event"] == "error"] == []
    first, second, third, regenerated, after_edit, forked = turns_of(events)
    assert first["prompt_tokens"] >= filler_tokens and (model == "tiny" or third["prompt_tokens"] >= 1500)

    # regenerate: the same prompt as the turn it replaces, all of it from cache but the one token sampled from
    assert regenerated["prompt_ids"] == third["prompt_ids"]
    assert regenerated["reused_from"] == "memory" and regenerated["prefilled_tokens"] == 1
    assert regenerated["reply_ids"] == third["reply_ids"]  # greedy: the same reply again
    # edit of message 2: the prompt up to message 2 (system prompt, messages 0 and 1) came from cache
    before_message_2 = len(first["prompt_ids"]) + len(first["reply_ids"])  # through message 1's own token ids
    assert after_edit["prompt_ids"][:before_message_2] == first["prompt_ids"] + first["reply_ids"]
    assert after_edit["reused_tokens"] >= before_message_2
    assert after_edit["prefilled_tokens"] <= after_edit["prompt_tokens"] - before_message_2
    # fork at message 3: b's first turn prefills only its new turn (plus the parent's last reply token, never fed)
    history = after_edit["prompt_ids"] + after_edit["reply_ids"]
    assert forked["prompt_ids"][: len(history)] == history
    assert forked["prefilled_tokens"] <= forked["prompt_tokens"] - len(history) + 1
    assert forked["shared_from"] == "a" and forked["shared_tokens"] == forked["reused_tokens"]
    stats = engine.stats()  # b shares a's full blocks instead of holding a copy of them
    assert stats.shared_blocks > 0 and stats.reused_tokens_other_session >= forked["shared_tokens"]

    for turn in (regenerated, after_edit, forked):
        assert_fed_only_what_was_prefilled(turn)
        assert_exact(bundle, engine, turn)


async def test_bad_positions_and_unknown_tabs_are_error_events_and_change_nothing(tiny_bundle, tmp_path):
    home = tmp_path / "home"
    events, _ = await run_script(tiny_bundle, home, [
        {"op": "open", "tab": "a"},
        {"op": "regenerate", "tab": "a"},  # nothing to regenerate yet
        {"op": "send", "tab": "a", "text": "hello", "max_new_tokens": 3}, {"op": "wait"},
        {"op": "open", "tab": "c"},
    ])
    saved = (home / "data" / "sessions" / "a.json").read_bytes()
    events, _ = await run_script(tiny_bundle, home, [
        {"op": "open", "tab": "a"},
        {"op": "open", "tab": "c"},
        {"op": "edit", "tab": "a", "message": 1, "text": "x"},  # a reply
        {"op": "edit", "tab": "a", "message": 2, "text": "x"},  # past the end
        {"op": "edit", "tab": "a", "message": 0},  # no text
        {"op": "fork", "tab": "a", "message": 5, "new_tab": "b"},
        {"op": "fork", "tab": "nowhere", "message": 0, "new_tab": "b"},
        {"op": "fork", "tab": "a", "message": 0, "new_tab": "c"},  # already open
        {"op": "fork", "tab": "a", "message": 0},  # no new_tab
        {"op": "regenerate", "tab": "nowhere"},
        {"op": "wait"},
    ])
    errors = [event for event in events if event["event"] == "error"]
    assert [event["event"] for event in events] == ["error"] * 8
    assert "is a reply" in errors[0]["message"] and "no message 2" in errors[1]["message"]
    assert '"text"' in errors[2]["message"] and "no message 5" in errors[3]["message"]
    assert errors[4]["tab"] == "nowhere" and "already open" in errors[5]["message"]
    assert '"new_tab"' in errors[6]["message"] and errors[7]["tab"] == "nowhere"
    assert (home / "data" / "sessions" / "a.json").read_bytes() == saved
    assert not (home / "data" / "sessions" / "b.json").exists()


async def test_a_fork_is_saved_with_its_origin_and_an_edit_saves_what_the_user_sees(tiny_bundle, tmp_path):
    home = tmp_path / "home"
    events, _ = await run_script(tiny_bundle, home, [
        {"op": "open", "tab": "a", "name": "Plans"},
        {"op": "send", "tab": "a", "text": "one", "max_new_tokens": 3},
        {"op": "send", "tab": "a", "text": "two", "max_new_tokens": 3},
        {"op": "fork", "tab": "a", "message": 2, "new_tab": "b"},
        {"op": "edit", "tab": "a", "message": 0, "text": "uno", "max_new_tokens": 3}, {"op": "wait"},
    ])
    assert [event["event"] for event in events] == ["turn"] * 3
    store = ConversationStore(Paths.resolve(home))
    parent, fork = store.get("a"), store.get("b")
    assert [(m.role, m.content) for m in parent.messages][:1] == [("user", "uno")] and len(parent.messages) == 2
    assert [m.content for m in fork.messages if m.role == "user"] == ["one", "two"] and len(fork.messages) == 3
    assert fork.forked_from == ForkOrigin("a", "Plans", 2) and fork.name == "Plans (fork)"


def test_fork_kv_shares_the_parents_blocks_and_the_first_turn_says_it_was_shared(tiny_bundle):
    with Engine(tiny_bundle, Settings()) as engine:
        history: list = []
        chat(engine, "parent", history, "hello there, tell me about the weather in the mountains today", max_new_tokens=4)
        block, block_bytes = engine.store.block_size, engine.store.block_bytes
        before = engine.stats().bytes
        parent = engine.session_stats("parent")
        assert parent.tokens >= 2 * block
        assert engine.fork_kv("parent", "child") == parent.tokens
        stats, child = engine.stats(), engine.session_stats("child")
        assert child.tokens == parent.tokens and child.bytes == parent.bytes
        # the child holds the parent's full blocks by reference: the store grew by its copied partial block at most
        full = parent.tokens // block
        assert stats.shared_blocks == full and stats.shared_bytes_saved == full * block_bytes
        assert stats.bytes == before + (block_bytes if parent.tokens % block else 0)
        assert engine.fork_kv("nobody", "orphan") == 0 and not engine.session_stats("orphan").resident
        with pytest.raises(EngineError):
            engine.fork_kv("parent", "../escape")
        child_history = list(history)
        first = chat(engine, "child", child_history, "and then?", max_new_tokens=4)
        assert first.shared_from == "parent" and first.shared_tokens == first.reused_tokens > 0
        later = chat(engine, "child", child_history, "more", max_new_tokens=4)
        assert later.shared_tokens == 0 and later.shared_from is None and later.reused_tokens > 0


# the App ---------------------------------------------------------------------------------------------

@pytest.fixture
def app_with_engine(tiny_bundle, data_dir):
    engines: list[Engine] = []

    def build(max_new_tokens: int = 4):
        settings = greedy(settings_with(max_new_tokens))
        paths = Paths.resolve(data_dir)
        engine = Engine(tiny_bundle, settings, snapshot_dir=paths.snapshots).start()
        engines.append(engine)
        return make_app(settings, engine, ConversationStore(paths), paths.user_themes, AppOptions()), ConversationStore(paths)

    yield build
    for engine in engines:
        engine.close()


def notes(app) -> list[str]:
    return [notification.message for notification in app._notifications]


async def send_and_wait(pilot, tab, text: str) -> None:
    count = len(tab.conversation.messages)
    await type_and_send(pilot, text)
    await wait_until(pilot, lambda: len(tab.conversation.messages) == count + 2 and not tab.generating)


async def test_ctrl_g_and_the_palette_regenerate_the_last_reply_in_place_and_say_greedy_repeats(app_with_engine):
    app, _ = app_with_engine()
    async with app.run_test(size=SIZE) as pilot:
        tab = app.chat_tabs.current
        await send_and_wait(pilot, tab, "hi")
        first_reply = tab.conversation.messages[1]
        await pilot.press("ctrl+g")
        await wait_until(pilot, lambda: tab.conversation.messages[-1] is not first_reply and not tab.generating)
        assert [m.role for m in tab.conversation.messages] == ["user", "assistant"]
        assert tab.conversation.messages[1].token_ids == first_reply.token_ids  # greedy: the same reply
        assert GREEDY_REGENERATE_NOTE in notes(app)
        assert len(tab.chat_view.replies) == 1
        assert tab.conversation.messages[1].stats["reused_tokens"] == tab.conversation.messages[1].stats["prompt_tokens"] - 1
        second_reply = tab.conversation.messages[1]
        await pilot.press("ctrl+p", *"Regenerate reply")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await wait_until(pilot, lambda: tab.conversation.messages[-1] is not second_reply and not tab.generating)
        assert len(tab.conversation.messages) == 2 and len(tab.chat_view.replies) == 1


async def test_keys_pick_a_message_and_edit_resends_it_dropping_what_followed(app_with_engine):
    app, store = app_with_engine()
    async with app.run_test(size=SIZE) as pilot:
        tab = app.chat_tabs.current
        await send_and_wait(pilot, tab, "first")
        await send_and_wait(pilot, tab, "second")
        await pilot.press("shift+tab")  # from the input to the chat view
        await wait_until(pilot, lambda: isinstance(app.focused, ChatView))
        assert tab.chat_view.selected == 3  # the last message is highlighted first
        footer = screen_text(app)
        assert "Edit & resend" in footer and "Fork here" in footer and "Regenerate" in footer
        await pilot.press("up", "up", "up")
        assert tab.chat_view.selected == 0
        await pilot.press("e")
        await wait_until(pilot, lambda: isinstance(app.screen, EditMessageScreen))
        await pilot.press(*" again", "enter")
        await wait_until(pilot, lambda: len(tab.conversation.messages) == 2 and not tab.generating)
        assert tab.conversation.messages[0].content == "first again"
        assert [block.message_index for block in tab.chat_view.message_blocks] == [0, 1]
    assert [m.content for m in store.get(tab.session_id).messages][:1] == ["first again"]


async def test_the_palette_edits_the_last_message_and_esc_in_the_dialog_changes_nothing(app_with_engine):
    app, _ = app_with_engine()
    async with app.run_test(size=SIZE) as pilot:
        tab = app.chat_tabs.current
        await send_and_wait(pilot, tab, "first")
        await send_and_wait(pilot, tab, "second")
        before = list(tab.conversation.messages)
        await pilot.press("ctrl+p", *"Edit and resend")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, EditMessageScreen))
        assert app.screen.query_one(PromptInput).text == "second"
        await pilot.press("escape")
        await wait_until(pilot, lambda: not isinstance(app.screen, EditMessageScreen))
        assert tab.conversation.messages == before and not tab.generating
        await pilot.press("ctrl+p", *"Edit and resend")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, EditMessageScreen))
        await pilot.press("!", "enter")
        await wait_until(pilot, lambda: tab.conversation.messages[2].content == "second!" and not tab.generating
                         and len(tab.conversation.messages) == 4)


async def test_a_click_picks_a_message_f_forks_there_and_both_tabs_then_generate_at_once(app_with_engine):
    app, store = app_with_engine(max_new_tokens=60)
    async with app.run_test(size=SIZE) as pilot:
        parent = app.chat_tabs.current
        parent.conversation.name = "Plans"
        parent.sampling = parent.sampling.__class__(max_new_tokens=3)
        await send_and_wait(pilot, parent, "first")
        await send_and_wait(pilot, parent, "second")
        first_user = parent.chat_view.query(UserMessage).first()
        await pilot.click(first_user)
        await wait_until(pilot, lambda: isinstance(app.focused, ChatView) and parent.chat_view.selected == 0)
        await pilot.press("down")
        assert parent.chat_view.selected == 1
        await pilot.press("f")
        await wait_until(pilot, lambda: len(app.chat_tabs.chat_tabs) == 2)
        child = app.chat_tabs.chat_tabs[1]
        assert app.chat_tabs.current is child and child.conversation.name == "Plans (fork)"
        assert [m.content for m in child.conversation.messages] == [m.content for m in parent.conversation.messages[:2]]
        assert store.get(child.session_id).forked_from == ForkOrigin(parent.session_id, "Plans", 1)

        streamed: list[tuple[str, bool]] = []
        parent.token_listeners.append(lambda _text: streamed.append(("parent", child.generating)))
        child.token_listeners.append(lambda _text: streamed.append(("child", parent.generating)))
        parent.sampling = child.sampling
        for tab, text in ((parent, "third"), (child, "another way")):
            tab.prompt_input.post_message(PromptInput.Submitted(tab.prompt_input, text))
        await wait_until(pilot, lambda: len(child.conversation.messages) == 4 and not child.generating
                         and len(parent.conversation.messages) == 6 and not parent.generating)
        assert ("parent", True) in streamed and ("child", True) in streamed
        stats = child.conversation.messages[3].stats
        assert stats["shared_with"] == "Plans"
        footer = child.chat_view.replies[-1].query_one(".reply-footer").render().plain
        assert "(shared with tab Plans)" in footer
        assert [m.content for m in parent.conversation.messages if m.role == "user"] == ["first", "second", "third"]


async def test_the_palette_forks_at_the_last_message(app_with_engine):
    app, _ = app_with_engine()
    async with app.run_test(size=SIZE) as pilot:
        tab = app.chat_tabs.current
        await send_and_wait(pilot, tab, "hi")
        await pilot.press("ctrl+p", *"Fork tab here")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(app.chat_tabs.chat_tabs) == 2)
        child = app.chat_tabs.current
        assert len(child.conversation.messages) == 2 and child.conversation.forked_from.message == 1
        assert any("tokens of KV shared" in note for note in notes(app))
