"""Errors name the real cause and the real remedy; headless turn events say how many old messages were left out."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatkv.config import Settings
from chatkv.conversation import Message
from chatkv.engine import Engine
from chatkv.engine.api import EngineError, Sampling
from chatkv.engine.prompt import ChatRenderer
from chatkv.paths import Paths
from test_reliability_support import run_script, script_bytes

LONG_SYSTEM = "You answer questions about gardening, briefly and kindly. " * 22  # about 240 tokens


@pytest.fixture
def paths(data_dir: Path) -> Paths:
    return Paths.resolve(data_dir)


@pytest.fixture
def renderer(tiny_bundle):
    return ChatRenderer(tiny_bundle.tokenizer, {2})


@pytest.fixture
def small_engine(tiny_bundle, paths: Paths):
    settings = Settings()
    settings.kv.max_tokens_per_session = 256
    settings.generation.max_new_tokens = 4
    engine = Engine(tiny_bundle, settings, snapshot_dir=paths.snapshots).start()
    yield engine
    engine.close()


def test_hi_under_a_too_long_system_prompt_blames_the_system_prompt(small_engine):
    messages = [Message("system", LONG_SYSTEM), Message("user", "hi")]
    with pytest.raises(EngineError) as caught:
        small_engine.submit("s", messages, Sampling())  # the default reply length, as in the TUI
    message = str(caught.value)
    assert message.startswith("The system prompt is too long") and "Shorten the system prompt" in message
    assert "This message" not in message and "max_tokens_per_session" in message


def test_a_long_message_under_a_short_system_prompt_blames_the_message_with_its_size_and_the_room_left(renderer):
    messages = [Message("system", "Be brief."), Message("user", "word " * 300)]
    with pytest.raises(EngineError) as caught:
        renderer.fit(messages, 200)
    message = str(caught.value)
    assert message.startswith("This message is too long") and "Shorten it" in message
    needed = len(renderer.render(messages)) - len(renderer.render([messages[0], Message("user", "")]))
    assert f"it takes {needed:,} tokens" in message and "after the system prompt" in message


def test_a_system_prompt_that_fits_alone_but_not_with_the_message_blames_the_message(renderer):
    system = Message("system", LONG_SYSTEM)
    budget = len(renderer.render([system, Message("user", "")])) + 5
    with pytest.raises(EngineError, match="^This message is too long"):
        renderer.fit([system, Message("user", "a sentence that is longer than five tokens for sure")], budget)
    assert renderer.fit([system, Message("user", "hi")], budget).dropped_messages == 0


def test_old_turns_are_dropped_before_anything_is_refused_and_never_the_system_prompt(renderer):
    system = Message("system", "Be brief.")
    history = []
    for turn in range(6):
        history += [Message("user", f"question {turn} " * 10), Message("assistant", f"answer {turn} " * 10)]
    rendered = renderer.fit([system, *history, Message("user", "now?")], 120)
    assert rendered.dropped_messages > 0 and rendered.dropped_messages % 2 == 0
    text = renderer.tokenizer.decode(rendered.ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and "question 0" not in text and "now?" in text


async def test_headless_turn_events_carry_dropped_messages(tiny_bundle, paths: Paths):
    settings = Settings()
    settings.kv.max_tokens_per_session = 160
    settings.generation.max_new_tokens = 4
    engine = Engine(tiny_bundle, settings, snapshot_dir=paths.snapshots).start()
    try:
        ops = [{"op": "open", "tab": "a"}]
        for turn in range(5):
            ops += [{"op": "send", "tab": "a", "text": f"question number {turn} " * 6}, {"op": "wait"}]
        run = await run_script(engine, settings, paths, script_bytes(*ops))
    finally:
        engine.close()
    turns = run.of("turn", "a")
    assert len(turns) == 5 and all("dropped_messages" in event for event in turns)
    assert turns[0]["dropped_messages"] == 0 and turns[-1]["dropped_messages"] > 0
