"""The engine in its own process (``EngineProcess``, the default behind the App): the same replies, token
for token, as the full-recompute reference; the engine's errors raised in the app's process; a child
that dies mid-reply ends the turn with a message instead of hanging the app; a model that cannot load
is reported with the child's own message."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from chatkv.config import Settings
from chatkv.conversation import Message
from chatkv.engine import EngineError, Sampling
from chatkv.engine.engine import eos_token_ids
from chatkv.engine.process import EngineProcess
from chatkv.engine.reference import greedy_full_recompute
from chatkv.model.errors import ModelError
from chatkv.paths import Paths

pytestmark = pytest.mark.real_model


def fp32_settings() -> Settings:
    settings = Settings()
    settings.model.dtype = "float32"
    settings.model.quant = "none"
    return settings


def start(settings: Settings, home: Path, models_dir: Path, notes: list[str]) -> EngineProcess:
    paths = Paths(data=home / "data", cache=home / "cache", config=home / "config")
    return EngineProcess(settings, paths, models_dir, notes.append, notes.append).start()


async def test_a_turn_streams_from_the_child_and_equals_the_full_recompute_reference(tmp_path, models_dir, real_bundle):
    notes: list[str] = []
    settings = fp32_settings()
    engine = start(settings, tmp_path, models_dir, notes)
    try:
        assert any("ready" in note for note in notes)  # the child's load progress reached the app
        # the model's own sampling defaults came back for new tabs (SmolLM2's generation config has none: the fallback)
        assert settings.generation.temperature == real_bundle.sampling_defaults.get("temperature", 0.2)
        question = [Message("user", "Name three colours of the rainbow.")]
        handle = engine.submit("tab-1", question, Sampling(max_new_tokens=24))
        streamed = [event async for event in handle]
        first = await handle.result()
        # a second turn on the same session comes from the child's KV cache
        follow_up = question + [Message("assistant", first.reply, token_ids=first.reply_ids),
                                Message("user", "Which of them is warmest?")]
        second = await engine.submit("tab-1", follow_up, Sampling(max_new_tokens=24)).result()
        stats, session = engine.stats(), engine.session_stats("tab-1")
    finally:
        engine.close()
    eos = eos_token_ids(real_bundle)
    for result in (first, second):
        assert result.finish_reason in ("stop", "length")
        assert result.reply_ids == greedy_full_recompute(real_bundle.model, result.prompt_ids, 24, eos)
    assert "".join(event.text for event in streamed) == first.reply
    assert [event.token_id for event in streamed] == first.reply_ids
    assert second.reused_from == "memory" and second.reused_tokens >= first.prompt_tokens
    assert stats.turns == 2 and stats.sessions == 1 and stats.weights.startswith("float32")
    assert session is not None and session.resident and session.tokens >= second.prompt_tokens
    log = tmp_path / "data" / "engine.log"
    assert log.exists() and (log.stat().st_mode & 0o777) == 0o600  # the child's output went there, not to the terminal


def test_the_engines_errors_are_raised_in_the_apps_process_and_the_engine_goes_on(tmp_path, models_dir):
    engine = start(fp32_settings(), tmp_path, models_dir, [])
    try:
        with pytest.raises(EngineError, match="session id"):
            engine.fork_kv("tab-1", "../escape")
        result = engine.submit("tab-1", [Message("user", "Hi")], Sampling(max_new_tokens=3)).wait(60)
        assert result.finish_reason in ("stop", "length") and result.new_tokens >= 1
        assert engine.fork_kv("tab-1", "tab-2") > 0  # the child's KV, shared with a fork, all in the child
        assert engine.session_stats("tab-2").resident
    finally:
        engine.close()
    with pytest.raises(EngineError, match="shut down"):
        engine.submit("tab-1", [Message("user", "Hi")])


async def test_a_child_killed_mid_reply_ends_the_turn_with_a_message_and_later_calls_fail_cleanly(tmp_path, models_dir):
    notes: list[str] = []
    engine = start(fp32_settings(), tmp_path, models_dir, notes)
    try:
        handle = engine.submit("tab-1", [Message("user", "Write a long story about a dragon.")],
                               Sampling(max_new_tokens=400))
        events = handle.__aiter__()
        first = await asyncio.wait_for(events.__anext__(), 60)
        os.kill(engine.pid, signal.SIGKILL)  # what the kernel's OOM killer or a native crash would do
        result = await asyncio.wait_for(handle.result(), 30)
        assert result.finish_reason == "error"
        assert "stopped unexpectedly" in result.error and "killed by signal 9" in result.error
        assert result.reply.startswith(first.text)  # what had streamed is kept
        with pytest.raises(EngineError, match="stopped unexpectedly"):
            engine.submit("tab-1", [Message("user", "Hello?")])
        assert any("stopped unexpectedly" in note for note in notes)  # the app was told, not only the turn
    finally:
        engine.close()


def test_a_model_that_cannot_load_is_reported_with_the_childs_message(tmp_path, models_dir):
    settings = fp32_settings()
    settings.model.device = "cuda"  # this machine has no GPU; with one the child would load fine, so skip there
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ModelError, match="torch sees no CUDA GPU"):
        start(settings, tmp_path, models_dir, [])


def test_abort_during_the_load_ends_the_child_and_the_start_at_once(tmp_path, models_dir, smollm2_dir):
    # what closing the app during a model load does (LoadingEngine.close): the child is told to end (SIGTERM, so a
    # kernel build in it would release torch's lock file) and start() raises instead of finishing the load
    import threading
    import time

    paths = Paths(data=tmp_path / "data", cache=tmp_path / "cache", config=tmp_path / "config")
    notes: list[str] = []
    loading = threading.Event()

    def progress(text: str) -> None:
        notes.append(text)
        loading.set()

    settings = fp32_settings()
    settings.model.model = str(smollm2_dir)
    process = EngineProcess(settings, paths, models_dir, progress, notes.append)
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            process.start()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - checked below
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    assert loading.wait(60)  # the child is loading the model
    pid = process.pid
    began = time.monotonic()
    process.abort()
    thread.join(30)
    assert not thread.is_alive() and time.monotonic() - began < 10
    assert isinstance(outcome[0], ModelError)
    assert not any("ready" in note for note in notes)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the child is gone (reaped), not left loading


async def until_replaced(supervisor, dead, timeout: float = 30.0) -> None:
    """Until ``supervisor`` (a LoadingEngine) has heard that the engine ``dead`` died."""
    for _ in range(int(timeout / 0.05)):
        if supervisor.engine is not dead:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the supervisor never heard of the engine's death")


async def test_a_killed_engine_is_started_again_and_the_next_turn_answers_until_it_dies_too_often(tmp_path, models_dir):
    # the app's engine (LoadingEngine over an EngineProcess, as `chatkv launch` builds it)
    from chatkv.runtime import LoadingEngine, start_engine

    paths = Paths(data=tmp_path / "data", cache=tmp_path / "cache", config=tmp_path / "config")
    notes: list[str] = []
    loads: list[str | None] = []
    settings = fp32_settings()
    engine = LoadingEngine(lambda supervisor: start_engine(settings, paths, models_dir, notes.append, notes.append,
                                                           supervisor), loads.append, note=notes.append).start()
    question = [Message("user", "Name three colours of the rainbow.")]
    try:
        await engine.until_ready()
        reference = await engine.submit("tab-1", question, Sampling(max_new_tokens=12)).result()
        handle = engine.submit("tab-1", question, Sampling(max_new_tokens=400))
        first = engine.engine
        async for _ in handle:
            os.kill(first.pid, signal.SIGKILL)  # mid-reply, as the OOM killer would
            break
        cut = await handle.result()
        assert cut.finish_reason == "error" and "stopped unexpectedly" in cut.error
        await until_replaced(engine, first)  # the turn ends first, then the supervisor hears of the death
        assert sum("Starting it again" in note for note in notes) == 1  # said once
        await engine.until_ready()
        again = await engine.submit("tab-1", question, Sampling(max_new_tokens=12)).result()
        assert again.finish_reason in ("stop", "length") and again.reply_ids == reference.reply_ids
        for _ in range(2):  # the second and third death within a minute: no more restarts
            dead = engine.engine
            os.kill(dead.pid, signal.SIGKILL)
            await until_replaced(engine, dead)
            await engine.until_ready()
        assert engine.engine is None and "3 times within a minute" in engine.error
        with pytest.raises(EngineError, match="start chatkv again"):
            engine.submit("tab-1", question, Sampling(max_new_tokens=4))
        assert loads == [None, None, None]  # the first load and two restarts
    finally:
        engine.close()
