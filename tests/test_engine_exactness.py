"""The engine's replies, with its cache and batching, are token-identical to a full-recompute reference (fp32, greedy)."""

from __future__ import annotations

import pytest

from chatkv.config import Settings
from chatkv.conversation import Message
from chatkv.engine import Engine, Sampling
from chatkv.engine.reference import greedy_full_recompute

QUESTIONS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Write a haiku about the sea.",
    "What is 2+2?",
]
FOLLOW_UPS = ["Tell me more.", "Why is that?", "Say it in one sentence."]


def run_conversations(engine: Engine, sessions: int, turns: int, max_new_tokens: int, system: str = ""):
    """Every session sends its turn at the same time; returns the results per turn."""
    conversations = {f"s{i}": ([Message("system", system)] if system else []) for i in range(sessions)}
    all_results = []
    for turn in range(turns):
        handles = {}
        for index, (session_id, messages) in enumerate(conversations.items()):
            text = QUESTIONS[index % len(QUESTIONS)] if turn == 0 else FOLLOW_UPS[(turn - 1) % len(FOLLOW_UPS)]
            messages.append(Message("user", text))
            handles[session_id] = engine.submit(session_id, list(messages), Sampling(max_new_tokens=max_new_tokens))
        results = {session_id: handle.wait(300) for session_id, handle in handles.items()}
        for session_id, result in results.items():
            assert result.error is None, result.error
            conversations[session_id].append(Message("assistant", result.reply, token_ids=result.reply_ids))
        all_results.append(results)
    return all_results


def assert_matches_reference(bundle, engine: Engine, results_by_turn, max_new_tokens: int) -> None:
    for turn, results in enumerate(results_by_turn):
        for session_id, result in results.items():
            expected = greedy_full_recompute(bundle.model, result.prompt_ids, max_new_tokens, engine.eos_ids)
            assert result.reply_ids == expected, f"turn {turn + 1} of {session_id} differs from the reference"


@pytest.mark.real_model
def test_real_model_batched_multi_turn_replies_equal_full_recompute(real_bundle):
    engine = Engine(real_bundle, Settings()).start()
    try:
        results = run_conversations(engine, sessions=4, turns=3, max_new_tokens=20)
    finally:
        engine.close()
    assert_matches_reference(real_bundle, engine, results, 20)
    # the cache was really used: from turn 2 on most of every prompt came from memory
    for results_of_turn in results[1:]:
        for result in results_of_turn.values():
            assert result.reused_from == "memory"
            assert result.reused_tokens > result.prompt_tokens // 2


def test_tiny_model_many_sessions_many_turns_equal_full_recompute(tiny_bundle):
    settings = Settings()
    settings.batching.max_batch_size = 6
    engine = Engine(tiny_bundle, settings).start()
    try:
        results = run_conversations(engine, sessions=6, turns=4, max_new_tokens=12, system="You are terse.")
    finally:
        engine.close()
    assert_matches_reference(tiny_bundle, engine, results, 12)


def test_chunked_prefill_of_a_long_prompt_equals_full_recompute(tiny_bundle):
    settings = Settings()
    settings.batching.prefill_chunk_tokens = 16  # a ~100-token prompt takes several steps
    engine = Engine(tiny_bundle, settings).start()
    try:
        long_text = " ".join(f"item {i}" for i in range(40))
        first = engine.submit("long", [Message("user", long_text)], Sampling(max_new_tokens=8))
        other = engine.submit("short", [Message("user", "hi")], Sampling(max_new_tokens=8))
        results = [first.wait(60), other.wait(60)]
    finally:
        engine.close()
    assert results[0].prompt_tokens > 4 * 16
    for result in results:
        assert result.reply_ids == greedy_full_recompute(tiny_bundle.model, result.prompt_ids, 8, engine.eos_ids)


def test_cache_disabled_recomputes_every_turn_with_the_same_replies(tiny_bundle):
    cached = Engine(tiny_bundle, Settings()).start()
    settings = Settings()
    settings.kv.enabled = False
    uncached = Engine(tiny_bundle, settings).start()
    try:
        with_cache = run_conversations(cached, sessions=2, turns=3, max_new_tokens=8)
        without_cache = run_conversations(uncached, sessions=2, turns=3, max_new_tokens=8)
    finally:
        cached.close()
        uncached.close()
    for turn_cached, turn_uncached in zip(with_cache, without_cache):
        for session_id in turn_cached:
            assert turn_cached[session_id].reply_ids == turn_uncached[session_id].reply_ids
            assert turn_uncached[session_id].reused_tokens == 0
            assert turn_uncached[session_id].prefilled_tokens == turn_uncached[session_id].prompt_tokens
    assert uncached.stats().sessions == 0  # nothing kept between turns
