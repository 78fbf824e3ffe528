"""chatkv in front of a real OpenAI-compatible server: llama.cpp's ``llama-server`` serving SmolLM2's GGUF.

The issue's acceptance, end to end: two tabs generate at once, each on its own slot; from turn 2 each reports
the server's cached prompt tokens (most of its prompt); Esc stops one reply (the server stops it too) without
disturbing the other; quit and relaunch restore both conversations, which continue against the server.
Headless mode and the server-wide /metrics are checked on the same server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from chatkv.config import BackendOptions, Settings
from chatkv.engine.api import Sampling
from chatkv.paths import Paths
from chatkv.remote.backend import RemoteBackend, api_root
from chatkv.store import ConversationStore
from chatkv.tui.app import AppOptions, make_app
from llama_server import running_llama_server

CHATKV = Path(sys.executable).parent / "chatkv"
SIZE = (130, 40)


@pytest.fixture(scope="module")
def llama_url():
    with running_llama_server(parallel=2, threads=1) as url:
        yield url


def start_backend(url: str) -> RemoteBackend:
    backend = RemoteBackend(BackendOptions(url=url)).start()
    assert backend.probe() == []
    return backend


async def wait_until(pilot, condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await pilot.pause(0.05)


def slot_busy(url: str, slot: int) -> bool:
    slots = httpx.get(f"{api_root(url)}/slots", timeout=5).json()
    return next(s for s in slots if s["id"] == slot)["is_processing"]


async def test_two_tabs_against_llama_server_cache_cancel_and_relaunch(llama_url, data_dir):
    paths = Paths.resolve(data_dir)
    store = ConversationStore(paths)
    settings = Settings()
    backend = start_backend(llama_url)
    assert backend.info.kind == "llama.cpp" and backend.info.slots == 2
    try:
        app = make_app(settings, backend, store, paths.user_themes, AppOptions())
        async with app.run_test(size=SIZE) as pilot:
            first = app.chat_tabs.current
            second = await app.open_new_conversation("second")
            overlap: list[tuple[str, bool]] = []  # (tab, was the other tab writing at that token)
            first.token_listeners.append(lambda _t: overlap.append(("first", second.generating)))
            second.token_listeners.append(lambda _t: overlap.append(("second", first.generating)))
            short = Sampling(max_new_tokens=24)
            for turn_text in ("Name three colours.", "Now name three fruits."):
                first.send(turn_text, short)
                second.send(turn_text.replace("three", "two"), short)
                await wait_until(pilot, lambda: not first.generating and not second.generating)
            # both generated at once: each received tokens while the other was still writing
            assert ("first", True) in overlap and ("second", True) in overlap
            for tab in (first, second):
                assert [m.role for m in tab.conversation.messages] == ["user", "assistant"] * 2
                turn1, turn2 = tab.conversation.messages[1].stats, tab.conversation.messages[3].stats
                assert turn1["reused_from"] == turn2["reused_from"] == "server"
                # from turn 2 on, most of the prompt came from the server's cache (its slot kept the history)
                assert turn2["reused_tokens"] >= 0.6 * turn2["prompt_tokens"], turn2
                footer = tab.chat_view.replies[-1].query_one(".reply-footer").render().plain
                assert f"{turn2['reused_tokens']}/{turn2['prompt_tokens']} prompt tokens from cache (server's cache)" in footer
            slots = {backend.session_stats(tab.session_id).slot for tab in (first, second)}
            assert slots == {0, 1}  # each tab on its own slot

            # Esc stops the first tab's reply (and the server's work on it); the second one finishes untouched
            tokens: list[str] = []
            first.token_listeners.append(tokens.append)
            first.send("Write a long story about a lighthouse.", Sampling(max_new_tokens=400))
            second.send("Count from one to twenty in words.", Sampling(max_new_tokens=40))
            await wait_until(pilot, lambda: len(tokens) >= 3)
            app.chat_tabs.activate(first)
            await pilot.press("escape")
            await wait_until(pilot, lambda: not first.generating)
            stopped = first.conversation.messages[-1]
            assert stopped.stats["finish_reason"] == "cancelled" and stopped.content
            first_slot = backend.session_stats(first.session_id).slot
            await wait_until(pilot, lambda: not slot_busy(llama_url, first_slot), timeout=10)
            await wait_until(pilot, lambda: not second.generating)
            finished = second.conversation.messages[-1]
            assert finished.role == "assistant" and finished.stats["finish_reason"] in ("length", "stop")
            assert finished.stats["new_tokens"] > 0
            histories = {tab.session_id: [m.content for m in tab.conversation.messages] for tab in (first, second)}
            await app.action_quit()
    finally:
        backend.close()

    # relaunch: a new backend and app over the same data folder
    backend = start_backend(llama_url)
    try:
        again = make_app(settings, backend, ConversationStore(paths), paths.user_themes, AppOptions())
        async with again.run_test(size=SIZE) as pilot:
            tabs = again.chat_tabs.chat_tabs
            assert {tab.session_id: [m.content for m in tab.conversation.messages] for tab in tabs} == histories
            for tab in tabs:
                tab.send("Thanks. One more, please.", Sampling(max_new_tokens=12))
            await wait_until(pilot, lambda: not any(tab.generating for tab in tabs))
            for tab in tabs:
                reply = tab.conversation.messages[-1]
                assert reply.role == "assistant" and reply.content and reply.stats["reused_from"] == "server"
                assert len(tab.conversation.messages) == len(histories[tab.session_id]) + 2
    finally:
        backend.close()


def test_headless_with_backend_reports_the_servers_cached_tokens_and_metrics(llama_url, tmp_path):
    script = "\n".join(json.dumps(line) for line in [
        {"op": "open", "tab": "a"},
        {"op": "send", "tab": "a", "text": "What is a cache?", "max_new_tokens": 16},
        {"op": "send", "tab": "a", "text": "Say it shorter.", "max_new_tokens": 16},
        {"op": "wait"},
        {"op": "stats"},
    ]) + "\n"
    completed = subprocess.run(
        [str(CHATKV), "launch", "--headless", "--script", "-", "--data-dir", str(tmp_path / "home"),
         "--backend", llama_url, "--ephemeral"],
        input=script.encode(), capture_output=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr.decode()
    events = [json.loads(line) for line in completed.stdout.decode().splitlines()]
    turns = [e for e in events if e["event"] == "turn"]
    [stats] = [e for e in events if e["event"] == "stats"]
    assert [t["turn"] for t in turns] == [1, 2]
    assert all(t["reused_from"] == "server" and t["batch_size"] is None for t in turns)
    assert turns[1]["reused_tokens"] >= 0.6 * turns[1]["prompt_tokens"]
    assert turns[1]["prefilled_tokens"] <= turns[1]["prompt_tokens"] - turns[1]["reused_tokens"] + 1
    # local-only figures are absent, not zero; the server's own counters come from its /metrics
    assert stats["bytes"] is None and stats["avg_batch_size"] is None
    assert stats["server"]["kind"] == "llama.cpp"
    assert stats["server"]["cached_prompt_tokens"] >= turns[1]["reused_tokens"]
    assert 0 < stats["server"]["cache_hit_rate"] < 1
    assert stats["server"]["kv_usage"] is None  # this llama.cpp does not export it: said, not invented


def test_bench_against_the_server_runs_multiturn_and_batching(llama_url, tmp_path):
    out = tmp_path / "bench.json"
    completed = subprocess.run(
        [str(CHATKV), "bench", "--backend", llama_url, "multiturn", "batching", "--quick", "--json", str(out),
         "--data-dir", str(tmp_path / "home")],
        capture_output=True, timeout=600, env={**os.environ, "CHATKV_BENCH_TINY": "1"},
    )
    assert completed.returncode == 0, completed.stderr.decode()
    document = json.loads(out.read_text())
    assert document["machine"]["server"] == "llama.cpp"
    multiturn = document["scenarios"]["multiturn"]["figures"]["server"]
    assert multiturn["hit_rate_from_turn_2"] > 0.5  # the conversation's history came from the server's cache
    rows = document["scenarios"]["batching"]["figures"]["server_together"]["by_sessions"]
    assert [row["sessions"] for row in rows] == [1, 2, 4] and all(row["tok_s"] > 0 for row in rows)
    assert "multiturn against the server" in completed.stdout.decode()
