"""Engine behaviour users rely on: reuse counters, shared forward passes, budgets, cancellation, failures, limits."""

from __future__ import annotations

import asyncio
import threading

import pytest

from chatkv.config import Settings
from chatkv.conversation import Message
from chatkv.engine import Engine, EngineError, QueueFullError, Sampling
from chatkv.engine.reference import greedy_full_recompute

from chat_turns import chat


def settings_with(**changes) -> Settings:
    settings = Settings()
    for dotted, value in changes.items():
        section, name = dotted.split("__")
        setattr(getattr(settings, section), name, value)
    return settings


@pytest.mark.real_model
def test_from_turn_two_only_uncached_tokens_are_prefilled_by_counters_and_by_tokens_fed(real_bundle):
    engine = Engine(real_bundle, settings_with(speculative__draft_tokens=0)).start()  # one token fed per decode step
    history: list[Message] = []
    try:
        chat(engine, "a", history, "Give me a word that rhymes with cat.", 12)
        for text in ("And one that rhymes with dog?", "Now a sentence using both."):
            cached_before = engine.session_stats("a").tokens
            fed_before = engine.runner.tokens_fed
            result = chat(engine, "a", history, text, 12)
            fed = engine.runner.tokens_fed - fed_before
            assert result.reused_tokens == cached_before > 0
            assert result.prefilled_tokens == result.prompt_tokens - cached_before
            # the model saw the prefilled tokens once, then one token per decode step (the last sampled token is never fed)
            assert fed == result.prefilled_tokens + result.new_tokens - 1
    finally:
        engine.close()


@pytest.mark.real_model
def test_four_sessions_submitting_at_once_share_prefill_and_decode_forward_passes(real_bundle):
    # one pass per decode step: speculative decoding, which may produce several tokens a step, is off here
    engine = Engine(real_bundle, settings_with(batching__max_batch_wait_ms=200, speculative__draft_tokens=0)).start()
    try:
        prompts = ["Count from one to twenty.", "List the days of the week.", "Name the planets.", "Spell the alphabet."]
        passes_before = engine.stats().forward_passes
        handles = [engine.submit(f"s{i}", [Message("user", p)], Sampling(max_new_tokens=16)) for i, p in enumerate(prompts)]
        results = [h.wait(300) for h in handles]
        passes = engine.stats().forward_passes - passes_before
    finally:
        engine.close()
    assert [r.batch_size for r in results] == [4, 4, 4, 4]
    longest = max(r.new_tokens for r in results)
    # one shared prefill pass, then one pass per decode step for all sessions together
    assert passes == longest
    assert passes < sum(r.new_tokens for r in results)


def test_prefill_only_mode_decodes_one_session_per_forward_pass(tiny_bundle):
    # one forward pass per token: speculative decoding, which gets several from one, is off here
    engine = Engine(tiny_bundle, settings_with(batching__prefill_only=True, batching__max_batch_wait_ms=200,
                                               speculative__draft_tokens=0)).start()
    try:
        handles = [engine.submit(f"s{i}", [Message("user", f"hello {i}")], Sampling(max_new_tokens=6)) for i in range(3)]
        results = [h.wait(60) for h in handles]
        stats = engine.stats()
    finally:
        engine.close()
    assert [r.batch_size for r in results] == [3, 3, 3]
    assert stats.forward_passes == 1 + sum(r.new_tokens - 1 for r in results)
    for result in results:
        assert result.reply_ids == greedy_full_recompute(tiny_bundle.model, result.prompt_ids, 6, engine.eos_ids)


def test_byte_budget_evicts_lru_sessions_keeps_peak_within_budget_and_evicted_session_recomputes_exactly(tiny_bundle):
    probe = Engine(tiny_bundle, Settings())
    budget = probe.store.block_bytes * 8  # blocks for about two and a half of these short sessions
    engine = Engine(tiny_bundle, settings_with(kv__max_bytes_total=budget, batching__max_batch_size=2)).start()
    histories = {f"s{i}": [] for i in range(6)}
    try:
        for session_id, history in histories.items():
            chat(engine, session_id, history, f"Tell me about number {session_id}")
            assert engine.stats().bytes <= budget
        stats = engine.stats()
        assert stats.evictions >= 3
        # every evicted session held at least one block of its own (its question differs from the others')
        assert stats.evicted_tokens > 0 and stats.evicted_bytes >= stats.evictions * probe.store.block_bytes
        assert stats.peak_bytes <= budget
        assert engine.session_stats("s0").resident is False
        result = chat(engine, "s0", histories["s0"], "And then?")  # evicted: recomputes all but shared prefix blocks
    finally:
        engine.close()
    assert result.reused_from in ("none", "memory") and result.reused_tokens % probe.store.block_size == 0
    assert result.prefilled_tokens > len(engine.renderer.render(histories["s0"][-1:]))  # its own turn was recomputed
    assert result.reply_ids == greedy_full_recompute(tiny_bundle.model, result.prompt_ids, 8, engine.eos_ids)
    assert engine.stats().peak_bytes <= budget


def test_session_count_limit_evicts_least_recently_used(tiny_bundle):
    engine = Engine(tiny_bundle, settings_with(kv__max_sessions=2)).start()
    histories = {name: [] for name in "abc"}
    try:
        chat(engine, "a", histories["a"], "one")
        chat(engine, "b", histories["b"], "two")
        chat(engine, "a", histories["a"], "three")  # a is now more recent than b
        chat(engine, "c", histories["c"], "four")  # evicts b, the least recently used
        resident = {s: engine.session_stats(s).resident for s in "abc"}
    finally:
        engine.close()
    assert resident == {"a": True, "b": False, "c": True}
    assert engine.stats().evictions == 1


def test_store_bytes_are_the_bytes_of_the_pool_blocks_held_each_counted_once(tiny_bundle):
    engine = Engine(tiny_bundle, Settings()).start()
    try:
        chat(engine, "a", [], "hello there")
        chat(engine, "b", [], "general kenobi")  # shares the default system prompt's full blocks with a
        store = engine.store
        distinct = {block_id for entry in store.sessions() for block_id in entry.block_table}
        stats = engine.stats()
        assert stats.bytes == len(distinct) * store.block_bytes
        assert stats.shared_blocks > 0
        assert stats.bytes + stats.shared_bytes_saved == sum(entry.nbytes for entry in store.sessions())
        assert engine.session_stats("a").bytes == len(store.peek("a").block_table) * store.block_bytes
    finally:
        engine.close()


def test_conversation_longer_than_the_session_limit_drops_oldest_turns_keeps_system_prompt_and_stays_exact(tiny_bundle):
    engine = Engine(tiny_bundle, settings_with(kv__max_tokens_per_session=128)).start()
    history = [Message("system", "You are a careful assistant.")]
    system_ids = engine.renderer.render([history[0], Message("user", "x")])[:8]
    try:
        results = [chat(engine, "long", history, f"Question number {i}: " + "words " * 12, 8) for i in range(6)]
    finally:
        engine.close()
    truncated = [r for r in results if r.dropped_messages]
    assert truncated, "the conversation never outgrew 128 tokens"
    for result in truncated:
        assert result.prompt_tokens <= 128
        assert result.prompt_ids[:8] == system_ids  # the system prompt is never dropped
        assert result.reply_ids == greedy_full_recompute(tiny_bundle.model, result.prompt_ids, 8, engine.eos_ids)


def test_past_the_session_limit_old_turns_go_down_to_a_low_water_mark_and_later_turns_reuse_the_kept_prefix(tiny_bundle):
    # a long chat through a 512-token limit: each time it passes the limit, old turns go until the prompt takes at
    # most half of it; the turns after that prefill only what is new, until the limit is reached again
    engine = Engine(tiny_bundle, settings_with(kv__max_tokens_per_session=512)).start()
    history = [Message("system", "You are a careful assistant.")]
    try:
        results = [chat(engine, "long", history, f"Question number {i}: " + "words " * 12, 8) for i in range(32)]
    finally:
        engine.close()
    limit_turns = [i for i, r in enumerate(results) if r.dropped_messages != results[i - 1].dropped_messages and i > 0]
    assert limit_turns and limit_turns[0] < 20, "the chat never outgrew 512 tokens"
    after = [r for i, r in enumerate(results) if i > limit_turns[0] and i not in limit_turns]
    assert len(after) >= 2 * len(limit_turns)  # most turns past the limit are cheap ones
    for i, result in enumerate(results):
        assert result.reply_ids == greedy_full_recompute(tiny_bundle.model, result.prompt_ids, 8, engine.eos_ids)
        if i > limit_turns[0] and i not in limit_turns:
            previous = results[i - 1]
            # everything the previous turn saw and wrote came from the cache; only the new message is prefilled
            assert result.reused_tokens >= previous.prompt_tokens + previous.new_tokens - 1
            assert result.prefilled_tokens < 40
    for turn in limit_turns:
        assert results[turn].prompt_tokens <= 0.5 * (512 - 8) + 1


def test_a_single_message_longer_than_the_context_is_refused_with_a_clear_message(tiny_bundle):
    engine = Engine(tiny_bundle, settings_with(kv__max_tokens_per_session=64))
    with pytest.raises(EngineError, match="too long"):
        engine.submit("x", [Message("user", "word " * 500)], Sampling(max_new_tokens=8))


def test_full_queue_rejects_with_a_clear_error_and_counts_it(tiny_bundle):
    engine = Engine(tiny_bundle, settings_with(batching__max_total_queued_requests=2))  # not started: nothing drains
    engine.submit("a", [Message("user", "one")])
    engine.submit("b", [Message("user", "two")])
    with pytest.raises(QueueFullError, match="queue is full"):
        engine.submit("c", [Message("user", "three")])
    assert engine.stats().rejected_requests == 1
    assert engine.stats().queue_depth == 2


def test_cancelling_one_session_keeps_its_text_leaves_others_running_and_its_next_turn_exact(tiny_bundle):
    engine = Engine(tiny_bundle, settings_with(batching__max_batch_wait_ms=100)).start()
    first_token = threading.Event()
    histories = {"a": [Message("user", "story please")], "b": [Message("user", "another story")]}
    try:
        handle_a = engine.submit("a", list(histories["a"]), Sampling(max_new_tokens=200))
        handle_b = engine.submit("b", list(histories["b"]), Sampling(max_new_tokens=30))
        while not handle_a.tokens:
            first_token.wait(0.01)
        assert engine.cancel("a")
        result_a, result_b = handle_a.wait(60), handle_b.wait(60)
        assert result_a.finish_reason == "cancelled" and 0 < result_a.new_tokens < 200
        assert result_b.finish_reason in ("length", "stop") and result_b.error is None
        assert result_b.reply_ids == greedy_full_recompute(tiny_bundle.model, result_b.prompt_ids, 30, engine.eos_ids)
        histories["a"].append(Message("assistant", result_a.reply, token_ids=result_a.reply_ids))
        follow = chat(engine, "a", histories["a"], "go on")
    finally:
        engine.close()
    assert follow.reused_tokens > 0
    assert follow.reply_ids == greedy_full_recompute(tiny_bundle.model, follow.prompt_ids, 8, engine.eos_ids)


def test_a_failure_in_one_session_of_a_batch_fails_that_turn_only(tiny_bundle):
    engine = Engine(tiny_bundle, settings_with(batching__max_batch_wait_ms=200)).start()

    def fail_for_b(session_id: str) -> None:
        if session_id == "b":
            raise RuntimeError("injected fault")

    engine.fault_hook = fail_for_b
    try:
        handles = {s: engine.submit(s, [Message("user", f"hi {s}")], Sampling(max_new_tokens=6)) for s in "abc"}
        results = {s: h.wait(60) for s, h in handles.items()}
        engine.fault_hook = None
        again = engine.submit("b", [Message("user", "hi b")], Sampling(max_new_tokens=6)).wait(60)
    finally:
        engine.close()
    assert results["b"].finish_reason == "error" and "injected fault" in results["b"].error
    for session_id in "ac":
        assert results[session_id].error is None
        assert results[session_id].reply_ids == greedy_full_recompute(
            tiny_bundle.model, results[session_id].prompt_ids, 6, engine.eos_ids)
    assert again.error is None  # the engine thread survived


def test_seeded_sampling_is_repeatable_and_differs_from_greedy(tiny_bundle):
    engine = Engine(tiny_bundle, Settings()).start()
    try:
        sampled = [engine.submit(f"s{i}", [Message("user", "pick words")],
                                 Sampling(max_new_tokens=16, temperature=1.5, top_p=0.95, seed=7)).wait(60)
                   for i in range(2)]
        greedy = engine.submit("g", [Message("user", "pick words")], Sampling(max_new_tokens=16)).wait(60)
    finally:
        engine.close()
    assert sampled[0].reply_ids == sampled[1].reply_ids
    assert sampled[0].reply_ids != greedy.reply_ids


def test_max_new_tokens_and_time_limit_end_the_turn_with_their_reason(tiny_bundle):
    engine = Engine(tiny_bundle, Settings()).start()
    try:
        by_length = engine.submit("a", [Message("user", "go")], Sampling(max_new_tokens=5)).wait(60)
        by_time = engine.submit("b", [Message("user", "go")], Sampling(max_new_tokens=5000, max_time_ms=50)).wait(60)
    finally:
        engine.close()
    assert by_length.finish_reason == "length" and by_length.new_tokens == 5
    assert by_time.finish_reason == "time" and by_time.new_tokens < 5000


async def test_async_stream_yields_tokens_whose_text_adds_up_to_the_reply(tiny_bundle):
    engine = Engine(tiny_bundle, Settings()).start()
    try:
        handle = engine.submit("a", [Message("user", "stream this")], Sampling(max_new_tokens=12))
        pieces = [event.text async for event in handle]
        result = await handle.result()
    finally:
        await asyncio.to_thread(engine.close)
    assert len(pieces) >= 1
    assert "".join(pieces) == result.reply
    assert result.ttft_ms > 0 and result.total_ms >= result.ttft_ms


def test_stats_report_hit_rate_and_batching_figures_consistently(tiny_bundle):
    engine = Engine(tiny_bundle, Settings()).start()
    history: list[Message] = []
    try:
        first = chat(engine, "a", history, "one")
        second = chat(engine, "a", history, "two")
        stats = engine.stats()
    finally:
        engine.close()
    assert stats.prompt_tokens == first.prompt_tokens + second.prompt_tokens
    assert stats.reused_tokens == second.reused_tokens > 0
    assert stats.hit_rate == pytest.approx(stats.reused_tokens / stats.prompt_tokens)
    assert stats.turns == 2 and stats.turn_hits == 1
    assert stats.generated_tokens == first.new_tokens + second.new_tokens
    assert stats.forward_passes >= 2 and stats.avg_batch_size == 1.0
    assert stats.decode_tok_s > 0 and stats.prefill_tok_s > 0


def test_a_sampling_failure_fails_only_that_turn(tiny_bundle, monkeypatch):
    import chatkv.engine.engine as engine_module

    real_next_token = engine_module.next_token

    def failing_for_hot_sampling(logits, sampling, generator, recent=()):
        if sampling.temperature == 9.0:
            raise ValueError("probabilities contain NaN")
        return real_next_token(logits, sampling, generator, recent)

    monkeypatch.setattr(engine_module, "next_token", failing_for_hot_sampling)
    engine = Engine(tiny_bundle, settings_with(batching__max_batch_wait_ms=200)).start()
    try:
        bad = engine.submit("bad", [Message("user", "x")], Sampling(max_new_tokens=5, temperature=9.0, seed=1))
        good = engine.submit("good", [Message("user", "y")], Sampling(max_new_tokens=5))
        bad_result, good_result = bad.wait(60), good.wait(60)
    finally:
        engine.close()
    assert bad_result.finish_reason == "error" and "NaN" in bad_result.error
    assert good_result.error is None and good_result.new_tokens == 5


def test_an_internal_engine_error_fails_every_pending_turn_instead_of_hanging(tiny_bundle, monkeypatch):
    engine = Engine(tiny_bundle, Settings())
    handle = engine.submit("a", [Message("user", "x")], Sampling(max_new_tokens=5))

    def broken_plan():
        raise AssertionError("scheduler bug")

    monkeypatch.setattr(engine.scheduler, "plan_step", broken_plan)
    engine.start()
    result = handle.wait(30)
    assert result.finish_reason == "error" and "scheduler bug" in result.error
    with pytest.raises(EngineError, match="internal error"):
        engine.submit("b", [Message("user", "y")])
    engine.close()


def test_drain_serves_every_submitted_turn_on_the_calling_thread_with_the_same_replies(tiny_bundle):
    threaded = Engine(tiny_bundle, Settings()).start()
    try:
        expected = [threaded.submit(f"s{i}", [Message("user", f"hello {i}")], Sampling(max_new_tokens=6)).wait(60)
                    for i in range(3)]
    finally:
        threaded.close()
    engine = Engine(tiny_bundle, Settings())  # never started: no thread of its own
    handles = [engine.submit(f"s{i}", [Message("user", f"hello {i}")], Sampling(max_new_tokens=6)) for i in range(3)]
    engine.drain()
    results = [handle.wait(0) for handle in handles]
    assert [r.reply_ids for r in results] == [r.reply_ids for r in expected]
    assert {r.batch_size for r in results} == {3}  # submitted together, prefilled together
    with Engine(tiny_bundle, Settings()) as started, pytest.raises(RuntimeError, match="not started"):
        started.drain()


def test_a_lone_conversation_never_waits_for_company_but_new_sessions_do(tiny_bundle):
    engine = Engine(tiny_bundle, settings_with(batching__max_batch_wait_ms=300)).start()
    history: list[Message] = []
    try:
        first = chat(engine, "solo", history, "hello")  # a new session may be one of several tabs: it waits
        second = chat(engine, "solo", history, "again")  # the same session on its own: no reason to wait
    finally:
        engine.close()
    assert first.ttft_ms >= 300
    assert second.ttft_ms < 300


@pytest.mark.real_model
def test_the_throughput_history_grows_while_a_long_reply_is_being_written(real_bundle):
    engine = Engine(real_bundle, Settings()).start()
    try:
        handle = engine.submit("long", [Message("user", "Write a long story about a lighthouse keeper.")],
                               Sampling(max_new_tokens=4000, max_time_ms=3000))
        while len(handle.tokens) < 3:
            handle._done.wait(0.01)
        before = len(engine.stats().decode_tok_s_history)
        result = handle.wait(60)
        during = len(engine.stats().decode_tok_s_history)
    finally:
        engine.close()
    assert result.finish_reason == "time"  # the engine was busy for the whole 3 s
    assert during >= before + 4  # sampled every 0.5 s while busy, not only when idle
