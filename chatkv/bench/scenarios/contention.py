"""contention: single-stream decode with one CPU-bound neighbour process, against the same machine without it.

A chat app shares its machine (a build, a browser, another model). The neighbour here is a Python
process spinning on one core. chatkv decodes the same reply quiet, then beside the neighbour, with its
thread policy (``chatkv.engine.threads``); then, for comparison, beside the neighbour with one thread
per core (torch's default), the setting that collapses. The figure that matters is busy / quiet with
the policy (target: at least 0.5).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from contextlib import contextmanager
from typing import Iterator

from chatkv.bench.context import BenchContext
from chatkv.bench.engine_turns import run_turn, running_engine
from chatkv.bench.result import ScenarioResult, Table, fmt
from chatkv.bench.stats import ratio
from chatkv.conversation import Message
from chatkv.engine.threads import available_cores, engine_threads

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
SPIN = "while True:\n    pass\n"


@contextmanager
def busy_neighbour() -> Iterator[None]:
    """A process keeping one core busy for as long as the block runs."""
    process = subprocess.Popen([sys.executable, "-c", SPIN], stdin=subprocess.DEVNULL)
    try:
        yield
    finally:
        process.kill()
        process.wait()


def _decode_rate(ctx: BenchContext, threads: int, label: str, tokens: int) -> float | None:
    settings = ctx.engine_settings()
    settings.model.threads = threads
    rates = []
    with running_engine(ctx.bundle, settings) as engine:
        run_turn(engine, f"bench-contention-{label}-warmup", [Message("user", "Say hello.")], 2)
        for round_number in range(ctx.sizes.limits_rounds):
            turn, _ = run_turn(engine, f"bench-contention-{label}-{round_number}", [Message("user", PROMPT)], tokens)
            if turn.new_tokens > 1:
                rates.append(turn.decode_tok_s)
    return statistics.median(rates) if rates else None


def run(ctx: BenchContext) -> ScenarioResult:
    import torch

    cores = available_cores()
    policy = engine_threads(ctx.settings.model.threads)
    tokens = max(ctx.sizes.limits_decode_tokens, 2)
    result = ScenarioResult("contention", parameters={
        "cores": cores, "policy_threads": policy, "all_core_threads": cores, "decode_tokens": tokens,
        "rounds": ctx.sizes.limits_rounds, "neighbour": "one Python process spinning on a core",
        "figure": "median of the rounds, decode tok/s from the engine's token stream",
    })
    original = torch.get_num_threads()
    try:
        ctx.progress(f"contention: quiet, {_threads(policy)}")
        quiet = _decode_rate(ctx, policy, "quiet", tokens)
        with busy_neighbour():
            ctx.progress(f"contention: one busy neighbour, {_threads(policy)}")
            busy = _decode_rate(ctx, policy, "busy", tokens)
            ctx.progress(f"contention: one busy neighbour, {cores} threads (one per core)")
            busy_all = _decode_rate(ctx, cores, "busy-all-cores", tokens)
    finally:
        torch.set_num_threads(original)
    result.figures = {
        "chatkv": {"quiet_tok_s": quiet, "busy_tok_s": busy, "busy_all_cores_tok_s": busy_all},
        "comparison": {"busy_vs_quiet": ratio(busy, quiet), "all_cores_busy_vs_quiet": ratio(busy_all, quiet)},
    }
    table = Table("contention: one stream decoding beside a CPU-bound neighbour", ["setting", "tok/s", "of quiet"])
    table.add(f"quiet, {_threads(policy)} (policy)", fmt(quiet), "")
    table.add(f"busy, {_threads(policy)} (policy)", fmt(busy), fmt(ratio(busy, quiet), 2))
    table.add(f"busy, {cores} threads (one per core)", fmt(busy_all), fmt(ratio(busy_all, quiet), 2))
    result.tables.append(table)
    return result


def _threads(count: int) -> str:
    return f"{count} thread" if count == 1 else f"{count} threads"
