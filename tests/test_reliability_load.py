"""Load, cancellation storms and failures inside a batch, on the tiny model (fp32, greedy).

Every reply is checked token by token against the plain full-recompute reference, and every prompt
against the tab that sent it, so a turn answered from another session's KV, or from a KV left
inconsistent by an eviction, a cancel or a failure, shows up as a wrong token. Waits have timeouts:
a deadlock fails the test instead of hanging it.

The CI variants take seconds; CHATKV_LONG_TESTS=1 adds a run of a few minutes (marker ``long``).
"""

from __future__ import annotations

import asyncio
import os
import random
import time

import pytest
from textual.widgets import Markdown

from chatkv.config import Settings
from chatkv.conversation import Message
from chatkv.engine import Engine, QueueFullError, Sampling
from chatkv.engine.api import TokenEvent, TurnResult
from chatkv.engine.engine import eos_token_ids
from chatkv.engine.reference import greedy_full_recompute
from chatkv.paths import Paths
from chatkv.store import ConversationStore
from stand_in_engine import StandInEngine
from test_reliability_support import run_script, script_bytes

TABS = 16
NEW_TOKENS = 6
TURN_TIMEOUT = 120.0
BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4  # tiny model: layers, K and V, kv heads, head dim, fp32
# 32 KV blocks of 16 tokens: sixteen tabs (three or more private blocks each) cannot all stay resident, so they
# evict each other, while one step's eight turns still fit
BUDGET = 4 * 128 * BYTES_PER_TOKEN

long_only = pytest.mark.skipif(os.environ.get("CHATKV_LONG_TESTS") != "1", reason="set CHATKV_LONG_TESTS=1 to run")


def load_settings(queue: int = 6) -> Settings:
    settings = Settings()
    settings.kv.max_bytes_total = BUDGET
    settings.kv.max_tokens_per_session = 384
    settings.batching.max_batch_size = 8
    settings.batching.max_batch_wait_ms = 5
    settings.batching.max_total_queued_requests = queue
    settings.generation.max_new_tokens = NEW_TOKENS
    return settings


def marker(tab: int) -> str:
    return f"tab-{tab:02d}-marker"


def user_text(tab: int, turn: int) -> str:
    return f"This is {marker(tab)} speaking, message {turn}. Please answer me."


class Reference:
    """Full-recompute replies, memoised: many turns share a prompt only by accident, but the check is costly."""

    def __init__(self, bundle) -> None:
        self.bundle = bundle
        self.eos = eos_token_ids(bundle)
        self._cache: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def reply(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        key = (tuple(prompt_ids), max_new_tokens)
        if key not in self._cache:
            self._cache[key] = greedy_full_recompute(self.bundle.model, prompt_ids, max_new_tokens, self.eos)
        return self._cache[key]


def assert_prompt_is_this_tabs(bundle, prompt_ids: list[int], tab: int, turn_text: str) -> None:
    prompt = bundle.tokenizer.decode(prompt_ids)
    assert prompt.rstrip().endswith("assistant") and turn_text in prompt
    others = [other for other in range(TABS) if other != tab and marker(other) in prompt]
    assert others == [], f"tab {tab}'s prompt holds text of tabs {others}"


# ---- sixteen tabs at once, repeatedly, in a small budget ----------------------------------------


def run_sixteen_tabs(bundle, rounds: int | None = None, seconds: float | None = None) -> dict:
    """Every tab sends, waits for its reply, sends again; turns refused by a full queue are sent again later.

    The engine starts only after the first wave is submitted, so that wave meets a full queue for sure.
    """
    engine = Engine(bundle, load_settings())
    reference = Reference(bundle)
    histories: dict[int, list[Message]] = {tab: [] for tab in range(TABS)}
    finished = {tab: 0 for tab in range(TABS)}
    pending: dict[int, tuple] = {}
    refused = 0
    checked = 0
    deadline = time.monotonic() + seconds if seconds else None

    def wants_more(tab: int) -> bool:
        return finished[tab] < rounds if rounds is not None else time.monotonic() < deadline

    try:
        while True:
            # the tabs served least so far try first: a fixed order would let the first tabs keep the queue full
            for tab in sorted(range(TABS), key=lambda tab: finished[tab]):
                if tab in pending or not wants_more(tab):
                    continue
                text = user_text(tab, finished[tab] + 1)
                history = histories[tab] + [Message("user", text)]
                try:
                    pending[tab] = (engine.submit(f"s{tab}", history, Sampling(max_new_tokens=NEW_TOKENS)), history, text)
                except QueueFullError:
                    refused += 1  # the caller is told at once; the tab sends it again after the next reply
            engine.start()
            if not pending:
                break
            next(iter(pending.values()))[0].wait(TURN_TIMEOUT)  # the oldest turn; TimeoutError means a deadlock
            for tab, (handle, history, text) in list(pending.items()):
                if not handle.done:
                    continue
                del pending[tab]
                result = handle.wait(0)
                assert result.session_id == f"s{tab}" and result.error is None, result.error
                assert result.finish_reason in ("length", "stop")
                assert_prompt_is_this_tabs(bundle, result.prompt_ids, tab, text)
                assert result.reply_ids == reference.reply(result.prompt_ids, NEW_TOKENS), f"tab {tab} turn {finished[tab] + 1}"
                histories[tab] = history + [Message("assistant", result.reply, token_ids=result.reply_ids)]
                finished[tab] += 1
                checked += 1
        stats = engine.stats()
    finally:
        engine.close()
    return {"stats": stats, "refused": refused, "checked": checked, "finished": finished}


def assert_load_outcome(outcome: dict) -> None:
    stats = outcome["stats"]
    assert outcome["checked"] == sum(outcome["finished"].values()) == stats.turns  # no turn lost, none counted twice
    assert stats.peak_bytes <= stats.budget_bytes == BUDGET
    assert stats.evictions > 0  # the budget really was too small for sixteen tabs
    assert outcome["refused"] > 0 and stats.rejected_requests == outcome["refused"]  # every refusal reached its caller
    assert stats.queue_depth == 0 and stats.active_turns == 0


def test_sixteen_tabs_sending_at_once_with_evictions_get_their_own_exact_replies_within_budget(tiny_bundle):
    outcome = run_sixteen_tabs(tiny_bundle, rounds=3)

    assert set(outcome["finished"].values()) == {3}
    assert_load_outcome(outcome)


@pytest.mark.long
@long_only
def test_sixteen_tabs_for_three_minutes_get_their_own_exact_replies_within_budget(tiny_bundle):
    outcome = run_sixteen_tabs(tiny_bundle, seconds=180)

    assert min(outcome["finished"].values()) >= 3
    assert_load_outcome(outcome)


async def test_sixteen_headless_tabs_at_once_get_their_own_exact_replies_and_every_refusal_is_an_error_event(
        tiny_bundle, data_dir):
    paths = Paths.resolve(data_dir)
    settings = load_settings(queue=4)
    engine = Engine(tiny_bundle, settings, snapshot_dir=paths.snapshots).start()
    opens = [{"op": "open", "tab": f"t{tab}"} for tab in range(TABS)]
    sends = [[{"op": "send", "tab": f"t{tab}", "text": user_text(tab, turn)} for tab in range(TABS)] for turn in (1, 2)]
    try:
        run = await run_script(engine, settings, paths, script_bytes(*opens, *sends[0], {"op": "wait"}, *sends[1],
                                                                     {"op": "wait"}, {"op": "stats"}))
        stats = engine.stats()
    finally:
        await asyncio.to_thread(engine.close)

    turns, errors = run.of("turn"), run.of("error")
    assert len(turns) + len(errors) == 2 * TABS  # every send is answered one way or the other
    refused = [error for error in errors if "queue is full" in error["message"]]
    assert refused == errors  # a queue-full refusal is the only error a load like this may give
    assert len(refused) == stats.rejected_requests
    reference = Reference(tiny_bundle)
    for event in turns:
        tab = int(event["tab"][1:])
        assert_prompt_is_this_tabs(tiny_bundle, event["prompt_ids"], tab, marker(tab))
        assert event["reply_ids"] == reference.reply(event["prompt_ids"], NEW_TOKENS), event["tab"]
    [reported] = run.of("stats")
    assert reported["peak_bytes"] <= reported["budget_bytes"] == BUDGET
    assert reported["evictions"] > 0


class EndsOnFirstFrameEngine(StandInEngine):
    """Writes one token, then ends the turn at the moment the reply draws its first frame: the timing that
    a busy engine hits by chance (the sixteen-tab headless run above sees it every few runs)."""

    def __init__(self) -> None:
        super().__init__(["Hi"])
        self.handles: list[InstantHandle] = []

    def submit(self, session_id: str, messages: list[Message], sampling: Sampling) -> "InstantHandle":
        handle = InstantHandle(session_id)
        self.handles.append(handle)
        return handle

    def end_every_turn(self) -> None:
        for handle in self.handles:
            handle.end()


class InstantHandle:
    """The consumer side of a TurnHandle; ``end()`` wakes the consumer at once (no hop through another thread)."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self._queue: asyncio.Queue[TokenEvent | None] = asyncio.Queue()
        self._queue.put_nowait(TokenEvent(session_id, "Hi", 1))
        self._result = TurnResult(session_id, "Hi", [1], [5, 6, 7], 3, 0, "none", 3, 1, 5.0, 0.0, 1, "stop")

    def end(self) -> None:
        self._queue.put_nowait(None)

    def __aiter__(self):
        return self._events()

    async def _events(self):
        while (item := await self._queue.get()) is not None:
            yield item
        self._queue.put_nowait(None)

    async def result(self) -> TurnResult:
        async for _ in self:
            pass
        return self._result


async def test_a_reply_that_ends_as_its_first_frame_is_drawn_is_reported_as_a_turn(data_dir, monkeypatch):
    paths = Paths.resolve(data_dir)
    engine = EndsOnFirstFrameEngine()
    first_frame = Markdown.get_stream

    def end_turn_then_stream(cls, markdown):
        engine.end_every_turn()  # the tab's worker is woken before the stream's task ever runs
        return first_frame(markdown)

    monkeypatch.setattr(Markdown, "get_stream", classmethod(end_turn_then_stream))
    run = await run_script(engine, Settings(), paths, script_bytes(
        {"op": "open", "tab": "a"}, {"op": "send", "tab": "a", "text": "hello"}, {"op": "wait"}))

    assert ConversationStore(paths).get("a").messages[-1].content == "Hi"  # saved either way
    assert run.of("error") == []
    assert [event["reply"] for event in run.of("turn")] == ["Hi"]


# ---- cancellation storms -------------------------------------------------------------------------


STORM_TABS = 8
STORM_TOKENS = 12


async def storm(bundle, rounds: int, seed: int) -> dict:
    """Each round every tab sends at once; a seeded random choice cancels some turns at once and others
    after a few streamed tokens. Each cancelled turn is kept with its partial reply, as a tab keeps it."""
    rng = random.Random(seed)
    settings = load_settings(queue=64)
    engine = Engine(bundle, settings).start()
    reference = Reference(bundle)
    histories: dict[int, list[Message]] = {tab: [] for tab in range(STORM_TABS)}
    counts = {"cancelled_waiting_or_early": 0, "cancelled_mid_reply": 0, "next_turn_after_cancel": 0, "reused_after_cancel": 0}
    cancelled_last = set()

    async def one_turn(tab: int, turn: int, cancel_after: int | None):
        history = histories[tab] + [Message("user", user_text(tab, turn))]
        handle = engine.submit(f"s{tab}", history, Sampling(max_new_tokens=STORM_TOKENS))
        if cancel_after == 0:
            engine.cancel(f"s{tab}")
        streamed = 0
        async for _event in handle:
            streamed += 1
            if streamed == cancel_after:
                engine.cancel(f"s{tab}")
        return tab, history, await asyncio.wait_for(handle.result(), TURN_TIMEOUT)

    try:
        for turn in range(1, rounds + 1):
            plans = {tab: rng.choice([None, None, 0, 1, 2, 4, 7]) for tab in range(STORM_TABS)}
            results = await asyncio.wait_for(
                asyncio.gather(*(one_turn(tab, turn, plans[tab]) for tab in range(STORM_TABS))), TURN_TIMEOUT)
            for tab, history, result in results:
                assert result.error is None, result.error
                expected = reference.reply(result.prompt_ids, STORM_TOKENS)
                if tab in cancelled_last:
                    counts["next_turn_after_cancel"] += 1
                    counts["reused_after_cancel"] += result.reused_tokens > 0
                if result.finish_reason == "cancelled":
                    # what was written before the cancel is exactly what the model would have written
                    assert result.reply_ids == expected[: len(result.reply_ids)], f"tab {tab} turn {turn}"
                    counts["cancelled_mid_reply" if result.new_tokens >= 2 else "cancelled_waiting_or_early"] += 1
                    cancelled_last.add(tab)
                else:
                    assert result.reply_ids == expected, f"tab {tab} turn {turn}"
                    cancelled_last.discard(tab)
                histories[tab] = history + [Message("assistant", result.reply, token_ids=result.reply_ids)]
        stats = engine.stats()
    finally:
        await asyncio.to_thread(engine.close)
    assert stats.active_turns == 0 and stats.queue_depth == 0
    return counts


async def test_cancellation_storm_leaves_every_cancelled_session_token_exact_on_its_next_turn(tiny_bundle):
    counts = await storm(tiny_bundle, rounds=4, seed=6)

    assert counts["cancelled_mid_reply"] > 0 and counts["cancelled_waiting_or_early"] > 0
    assert counts["next_turn_after_cancel"] > 0  # and those turns were exact (checked in storm)
    assert counts["reused_after_cancel"] > 0  # the KV of cancelled sessions was reused, not just recomputed


@pytest.mark.long
@long_only
async def test_long_cancellation_storm_leaves_every_cancelled_session_token_exact(tiny_bundle):
    for seed in range(10):
        counts = await storm(tiny_bundle, rounds=8, seed=seed)
        assert counts["cancelled_mid_reply"] > 0


# ---- a failure inside a batch, part way through a turn --------------------------------------------


@pytest.mark.parametrize("where", ["during_chunked_prefill", "during_decode_after_three_tokens"])
def test_a_failure_part_way_through_a_turn_fails_only_that_turn_and_its_retry_is_exact(tiny_bundle, where: str):
    """test_engine_behaviour covers a failure at the first step; here the failing session already has KV
    from the turn (a prefill chunk, or three generated tokens) when it fails."""
    settings = Settings()
    settings.batching.max_batch_wait_ms = 200
    settings.batching.prefill_chunk_tokens = 32
    engine = Engine(tiny_bundle, settings)
    reference = Reference(tiny_bundle)
    handles = {}
    calls = {"b": 0}
    broken = set()

    def fail_b_part_way(session_id: str) -> None:
        if session_id != "b":
            return
        calls["b"] += 1
        tokens = len(handles["b"].tokens)
        if (where == "during_chunked_prefill" and calls["b"] == 2 and tokens == 0) or \
                (where == "during_decode_after_three_tokens" and tokens >= 3):
            broken.add("b")
        if "b" in broken:
            raise RuntimeError("injected fault")

    long_question = " ".join(f"word{index}" for index in range(60))  # several 32-token chunks
    conversations = {"a": [Message("user", "hello a")], "b": [Message("user", long_question)], "c": [Message("user", "hi c")]}
    engine.fault_hook = fail_b_part_way
    try:
        for session_id, messages in conversations.items():
            handles[session_id] = engine.submit(session_id, messages, Sampling(max_new_tokens=10))
        engine.start()
        results = {session_id: handle.wait(TURN_TIMEOUT) for session_id, handle in handles.items()}
        engine.fault_hook = None
        retry = engine.submit("b", conversations["b"], Sampling(max_new_tokens=10)).wait(TURN_TIMEOUT)
    finally:
        engine.close()

    assert broken == {"b"}, "the fault never fired"
    failed = results["b"]
    assert failed.finish_reason == "error" and "injected fault" in failed.error
    assert failed.new_tokens == (0 if where == "during_chunked_prefill" else 3)
    for session_id in "ac":
        assert results[session_id].error is None
        assert results[session_id].reply_ids == reference.reply(results[session_id].prompt_ids, 10)
    # the failed turn's KV (a chunk of prompt, or prompt and three tokens) is reused and stays exact
    assert retry.error is None and retry.reused_tokens > 0
    assert retry.reply_ids == reference.reply(retry.prompt_ids, 10)
