"""Speculative decoding by prompt lookup: greedy replies are token-identical with and without guessing.

The guesses come from the conversation itself (chatkv.engine.drafter); the engine verifies them in one
forward and keeps what the model agrees with. The tiny random model used here (``lively``) mixes runs of a
repeated token with changing ones, so its guesses both hit and miss; a planted guesser that is right up to
a chosen position covers every length of accepted prefix; the real model is asked to repeat a paragraph.
"""

from __future__ import annotations

import asyncio

import pytest

from chatkv.config import BatchingOptions, Settings
from chatkv.conversation import Message
from chatkv.engine import Engine, Sampling
from chatkv.engine.api import TurnHandle
from chatkv.engine.drafter import NgramDrafter
from chatkv.engine.reference import greedy_full_recompute
from chatkv.engine.scheduler import DRAFT_STEP_ROWS, Scheduler
from chatkv.engine.turn import Turn, TurnState
from tests.conftest import make_tiny_bundle

PARAGRAPH = ("The lighthouse stood on a rock at the edge of the bay, and for forty years the same family kept its "
             "lamp burning. Every evening the keeper climbed the one hundred and twelve steps, trimmed the wick, "
             "wound the clockwork that turned the lens, and wrote the weather in a leather book.")
QUOTE = PARAGRAPH + "\n\nRepeat the paragraph above word for word."
LOOPY = "one two three four one two three four one two three"


@pytest.fixture(scope="module")
def lively(tiny_bundle):
    return make_tiny_bundle(tiny_bundle.tokenizer, initializer_range=0.1)


def engine_with(bundle, draft_tokens: int, **batching) -> Engine:
    settings = Settings()
    settings.speculative.draft_tokens = draft_tokens
    for name, value in batching.items():
        setattr(settings.batching, name, value)
    return Engine(bundle, settings)


def run_together(engine: Engine, requests: dict[str, tuple[str, Sampling]]):
    """Submit every session's turn at once and serve them on this thread (the engine is not started)."""
    handles = {sid: engine.submit(sid, [Message("user", text)], sampling) for sid, (text, sampling) in requests.items()}
    engine.drain()
    results = {sid: handle.wait(0) for sid, handle in handles.items()}
    for result in results.values():
        assert result.error is None, result.error
    return results


# the drafter ---------------------------------------------------------------------------------------
def test_drafter_proposes_what_followed_the_latest_earlier_occurrence_of_the_suffix():
    drafter = NgramDrafter([5, 6, 7, 8, 9, 1, 2, 5, 6, 7, 3, 4, 5, 6], max_ngram=3, min_ngram=2)
    # the suffix 5 6 (no earlier 4 5 6) last came before 7 3 4
    assert drafter.propose(3) == [7, 3, 4]
    drafter.extend([7])
    assert drafter.propose(2) == [3, 4]  # 5 6 7 last came before 3 4
    assert drafter.propose(0) == []


def test_drafter_without_a_long_enough_match_proposes_nothing():
    drafter = NgramDrafter([1, 2, 3, 4, 9, 3, 4], max_ngram=3, min_ngram=3)
    assert drafter.propose(4) == []  # "3 4" repeats, but no 3-gram does
    drafter.extend([1, 2, 3])
    assert drafter.propose(4) == [4, 9, 3, 4]


def test_drafter_continues_a_loop_past_the_end_of_what_it_has_seen():
    drafter = NgramDrafter([9, 1, 2, 3, 1, 2, 3], max_ngram=3, min_ngram=3)
    assert drafter.propose(5) == [1, 2, 3, 1, 2]  # 1 2 3 came before 1 2 3, which came before...
    drafter = NgramDrafter([7, 7, 7, 7], max_ngram=3, min_ngram=3)
    assert drafter.propose(4) == [7, 7, 7, 7]


# the scheduler -------------------------------------------------------------------------------------
def decoding_turn(session_id: str, prompt: list[int], reply: list[int], greedy: bool = True) -> Turn:
    sampling = Sampling(max_new_tokens=100, temperature=0.0 if greedy else 0.7)
    turn = Turn(session_id, prompt, sampling, TurnHandle(session_id, None))
    turn.state, turn.reply_ids, turn.max_new_tokens = TurnState.DECODING, list(reply), 100
    return turn


def test_scheduler_adds_guesses_to_greedy_turns_only_and_keeps_the_step_within_its_draft_rows():
    scheduler = Scheduler(BatchingOptions(), draft_tokens=3)
    periodic = [1, 2, 3, 4, 5, 6, 7] * 3
    scheduler.running = [decoding_turn("sampled", periodic, [1], greedy=False)]
    scheduler.running += [decoding_turn(f"g{i}", periodic, [1]) for i in range(2)]
    plan = scheduler.plan_step()
    assert plan[0].draft == [] and plan[0].tokens == [1]
    assert plan[1].draft == [2, 3, 4] and plan[1].tokens == [1, 2, 3, 4]
    assert plan[2].draft == [2, 3]  # what was left of the step's rows
    assert sum(len(p.tokens) for p in plan) == DRAFT_STEP_ROWS
    assert [p.logits_rows for p in plan] == [1, 4, 3]


def test_a_guess_never_reaches_past_max_new_tokens():
    turn = decoding_turn("a", [1, 2, 3, 4, 5, 6, 7, 8] * 2, [1, 2, 3])
    turn.max_new_tokens = 6
    assert turn.propose_draft(7) == [4, 5]  # with the token the verifying forward adds: 3 + 2 + 1 = 6


# exactness on the tiny model ------------------------------------------------------------------------
def test_tiny_model_batched_replies_with_guesses_equal_plain_decoding_and_full_recompute(lively):
    requests = {
        "loopy": (LOOPY, Sampling(max_new_tokens=40)),
        "quote": (QUOTE, Sampling(max_new_tokens=40)),
        "short": ("hi", Sampling(max_new_tokens=3)),
        "sampled": (LOOPY, Sampling(max_new_tokens=30, temperature=0.8, seed=3)),  # never guesses
    }
    plain = run_together(engine_with(lively, 0), requests)
    engine = engine_with(lively, 5)
    guessed = run_together(engine, requests)
    stats = engine.stats()
    for session_id, result in guessed.items():
        assert result.reply_ids == plain[session_id].reply_ids, session_id
        assert result.finish_reason == plain[session_id].finish_reason
        # the KV store holds what plain decoding leaves: the prompt and every reply token but the last
        assert engine.store.peek(session_id).token_ids == result.prompt_ids + result.reply_ids[:-1]
    for session_id in ("loopy", "quote", "short"):
        expected = greedy_full_recompute(lively.model, guessed[session_id].prompt_ids,
                                         requests[session_id][1].max_new_tokens, engine.eos_ids)
        assert guessed[session_id].reply_ids == expected, session_id
    assert stats.drafted_tokens > 0 and 0 < stats.accepted_draft_tokens <= stats.drafted_tokens
    assert stats.draft_acceptance_rate == stats.accepted_draft_tokens / stats.drafted_tokens
    assert stats.draft_tokens == 5


def test_tiny_model_turns_after_a_guessed_turn_reuse_its_kv_and_stay_exact(lively):
    engine = engine_with(lively, 7).start()
    history: list[Message] = []
    try:
        for text in (LOOPY, "again", QUOTE):
            history.append(Message("user", text))
            result = engine.submit("a", list(history), Sampling(max_new_tokens=30)).wait(120)
            assert result.error is None, result.error
            assert result.reply_ids == greedy_full_recompute(lively.model, result.prompt_ids, 30, engine.eos_ids)
            if len(history) > 1:
                assert result.reused_tokens > 0
            history.append(Message("assistant", result.reply, token_ids=result.reply_ids))
        # a new session with the same conversation finds the guessed turns' full blocks by their hash chain
        committed = engine.call_in_engine(lambda: engine.store.peek("a").length).result()
        history.append(Message("user", "once more"))
        twin = engine.submit("b", list(history), Sampling(max_new_tokens=4)).wait(120)
    finally:
        engine.close()
    assert engine.stats().accepted_draft_tokens > 0
    assert twin.shared_from == "a" and twin.shared_tokens == committed // 16 * 16 > 0


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_tiny_model_quantized_replies_with_guesses_equal_their_own_plain_decoding(tiny_bundle, quant):
    bundle = make_tiny_bundle(tiny_bundle.tokenizer, quant, initializer_range=0.1)
    requests = {"loopy": (LOOPY, Sampling(max_new_tokens=40)), "quote": (QUOTE, Sampling(max_new_tokens=40))}
    plain = run_together(engine_with(bundle, 0), requests)
    engine = engine_with(bundle, DRAFT_STEP_ROWS - 1)
    guessed = run_together(engine, requests)
    assert engine.stats().accepted_draft_tokens > 0
    for session_id, result in guessed.items():
        assert result.reply_ids == plain[session_id].reply_ids, session_id
        expected = greedy_full_recompute(bundle.reference_model, result.prompt_ids, 40, engine.eos_ids)
        assert result.reply_ids == expected, session_id


def plant_guesser(monkeypatch, replies: dict[str, list[int]], miss_every: int | None) -> None:
    """Guesses from the known replies, with the contract of ``Turn.propose_draft`` (greedy only, within
    max_new_tokens); with ``miss_every`` the guess goes wrong at position ``tokens so far % miss_every``, so
    over a reply every length of accepted prefix, none and all included, occurs."""
    def propose(turn: Turn, max_tokens: int) -> list[int]:
        room = min(max_tokens, turn.max_new_tokens - len(turn.reply_ids) - 1)
        if room <= 0 or not turn.sampling.greedy or turn.state is not TurnState.DECODING:
            return []
        done = len(turn.reply_ids)
        guess = list(replies[turn.session_id][done : done + room])
        if miss_every and done % miss_every < len(guess):
            guess[done % miss_every] += 1
        return guess

    monkeypatch.setattr(Turn, "propose_draft", propose)


def test_guesses_right_up_to_any_position_give_the_reply_of_plain_decoding(lively, monkeypatch):
    requests = {
        "loopy": (LOOPY, Sampling(max_new_tokens=60)),
        "quote": (QUOTE, Sampling(max_new_tokens=60)),
        "sampled": (LOOPY, Sampling(max_new_tokens=20, temperature=0.8, seed=3)),
    }
    plain = run_together(engine_with(lively, 0), requests)
    plant_guesser(monkeypatch, {sid: r.reply_ids for sid, r in plain.items()}, miss_every=5)
    engine = engine_with(lively, 4)
    guessed = run_together(engine, requests)
    for session_id, result in guessed.items():
        assert result.reply_ids == plain[session_id].reply_ids, session_id
        assert engine.store.peek(session_id).token_ids == result.prompt_ids + result.reply_ids[:-1]
    stats = engine.stats()
    assert 0 < stats.accepted_draft_tokens < stats.drafted_tokens


def test_a_stop_token_among_accepted_guesses_ends_the_reply_where_plain_decoding_does(lively, monkeypatch):
    plain = run_together(engine_with(lively, 0), {"a": (LOOPY, Sampling(max_new_tokens=40))})["a"]
    # a stop token deep in the reply, which the planted guesser offers in the middle of a guess
    stop_at = next(index for index, token in enumerate(plain.reply_ids) if index >= 12 and token not in plain.reply_ids[:index])
    stop = plain.reply_ids[stop_at]
    plant_guesser(monkeypatch, {"a": plain.reply_ids}, miss_every=None)
    ends = {}
    for draft_tokens in (0, 7):
        engine = engine_with(lively, draft_tokens)
        engine.eos_ids = engine.eos_ids | {stop}
        ends[draft_tokens] = run_together(engine, {"a": (LOOPY, Sampling(max_new_tokens=40))})["a"]
        assert engine.store.peek("a").token_ids == ends[draft_tokens].prompt_ids + ends[draft_tokens].reply_ids[:-1]
        # every token after the first was a right guess, except each step's own pick (tokens 8, 16, ...)
        assert engine.stats().accepted_draft_tokens == sum(1 for i in range(1, stop_at + 1) if i % (draft_tokens + 1))
    assert ends[7].reply_ids == ends[0].reply_ids == plain.reply_ids[: stop_at + 1]
    assert ends[7].finish_reason == ends[0].finish_reason == "stop"


def test_length_limit_inside_a_run_of_guesses_stops_at_exactly_max_new_tokens(lively):
    for max_new_tokens in (1, 2, 9, 17):
        plain = run_together(engine_with(lively, 0), {"a": (LOOPY, Sampling(max_new_tokens=max_new_tokens))})["a"]
        guessed = run_together(engine_with(lively, 7), {"a": (LOOPY, Sampling(max_new_tokens=max_new_tokens))})["a"]
        assert guessed.reply_ids == plain.reply_ids
        assert guessed.new_tokens == max_new_tokens and guessed.finish_reason == "length"


async def test_each_accepted_token_streams_as_its_own_event_in_order(lively):
    engine = engine_with(lively, 7).start()
    try:
        handle = engine.submit("a", [Message("user", LOOPY)], Sampling(max_new_tokens=40))
        events = [event async for event in handle]
        result = await handle.result()
    finally:
        await asyncio.to_thread(engine.close)
    assert engine.stats().accepted_draft_tokens > 0
    assert [event.token_id for event in events] == [t for t in result.reply_ids if t not in engine.eos_ids]
    assert "".join(event.text for event in events) == result.reply


def test_decode_rate_counts_tokens_produced_not_tokens_fed():
    from chatkv.engine.metrics import EngineMetrics

    metrics = EngineMetrics()
    metrics.record_step(1, 0, 8, 0.5, 0, decode_generated=6)  # one stream fed 1 + 7 guesses, kept 5 and its own pick
    assert metrics.rates()[0] == pytest.approx(12.0)


# the real model ------------------------------------------------------------------------------------
@pytest.mark.real_model
def test_real_model_repeating_a_paragraph_with_guesses_equals_plain_decoding_and_full_recompute(real_bundle):
    requests = {
        "quote": (QUOTE, Sampling(max_new_tokens=48)),
        "free": ("Write a haiku about the sea.", Sampling(max_new_tokens=24)),
        "sampled": (QUOTE, Sampling(max_new_tokens=16, temperature=0.7, seed=1)),
    }
    plain = run_together(engine_with(real_bundle, 0), requests)
    engine = engine_with(real_bundle, 7)
    guessed = run_together(engine, requests)
    for session_id, result in guessed.items():
        assert result.reply_ids == plain[session_id].reply_ids, session_id
    for session_id in ("quote", "free"):
        expected = greedy_full_recompute(real_bundle.model, guessed[session_id].prompt_ids,
                                         requests[session_id][1].max_new_tokens, engine.eos_ids)
        assert guessed[session_id].reply_ids == expected, session_id
    stats = engine.stats()
    assert stats.draft_acceptance_rate > 0.5  # the reply quotes its context
    assert stats.forward_passes < sum(len(r.reply_ids) for r in guessed.values())


# the default mode ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def default_mode_bundle(models_dir):
    """SmolLM2 as a user runs it by default: bfloat16 activations, int4 weights (an int8 head)."""
    from chatkv.model.loader import load_model

    return load_model("smollm2", models_dir, dtype="bfloat16", device="cpu", quant="int4")


@pytest.mark.real_model
def test_greedy_replies_in_the_default_bf16_int4_mode_are_the_same_with_and_without_guesses(default_mode_bundle):
    # Verifying k guesses computes k + 1 rows in one pass; each must get the arithmetic a decode row gets
    # (the decode kernel's attention, the quantized kernels per row), or the reply drifts from where guesses start.
    prompts = {"quote": QUOTE, "free": "Explain how a bicycle works.",  # on main before the fix: differed at 26
               "echo": "Repeat after me: the quick brown fox jumps over the lazy dog. The quick brown fox jumps over "
                       "the lazy dog."}
    greedy = Sampling(max_new_tokens=60, temperature=0.0)
    replies = {}
    for draft_tokens in (3, 0):
        engine = engine_with(default_mode_bundle, draft_tokens)
        try:
            for name, text in prompts.items():  # one tab at a time, as a user chatting alone
                replies[draft_tokens, name] = run_together(engine, {name: (text, greedy)})[name]
            drafted = engine.stats().drafted_tokens
        finally:
            engine.close()
        if draft_tokens:
            assert drafted > 0  # guesses were verified, so the comparison tests something
    for name in prompts:
        assert replies[3, name].reply_ids == replies[0, name].reply_ids, name
