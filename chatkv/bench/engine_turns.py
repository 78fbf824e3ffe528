"""Running turns through chatkv's engine from the bench: one at a time, or many at once, timed by wall clock."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from chatkv.config import Settings
from chatkv.conversation import Message
from chatkv.engine import Engine, Sampling, TurnResult


@contextmanager
def running_engine(bundle: Any, settings: Settings, snapshot_dir: Path | None = None) -> Iterator[Engine]:
    """An engine served on this thread (``Engine.drain``), not its own: the baselines run here too, and
    one thread doing all the torch work keeps a single set of OpenMP workers (two sets on a 2-core
    machine slow every measurement, chatkv's and the baselines' alike)."""
    engine = Engine(bundle, settings, snapshot_dir=snapshot_dir)
    try:
        yield engine
    finally:
        engine.close()


def greedy(max_new_tokens: int) -> Sampling:
    return Sampling(max_new_tokens=max_new_tokens, temperature=0.0)


def run_turn(engine: Engine, session_id: str, messages: list[Message], max_new_tokens: int) -> tuple[TurnResult, float]:
    """One turn, waited for; returns the engine's result and the wall time from submit to result in ms."""
    started = time.perf_counter()
    handle = engine.submit(session_id, messages, greedy(max_new_tokens))
    engine.drain()
    result = handle.wait(0)
    wall_ms = (time.perf_counter() - started) * 1000
    raise_if_failed(result)
    return result, wall_ms


def run_together(engine: Engine, turns: list[tuple[str, list[Message]]], max_new_tokens: int) -> tuple[list[TurnResult], float]:
    """Submit every turn at once (so the engine may batch them), wait for all; returns results and wall seconds."""
    started = time.perf_counter()
    handles = [engine.submit(session_id, messages, greedy(max_new_tokens)) for session_id, messages in turns]
    engine.drain()
    results = [handle.wait(0) for handle in handles]
    wall_s = time.perf_counter() - started
    for result in results:
        raise_if_failed(result)
    return results, wall_s


def raise_if_failed(result: TurnResult) -> None:
    if result.finish_reason == "error" or result.error:
        raise RuntimeError(f"chatkv failed a turn of session {result.session_id}: {result.error}")
