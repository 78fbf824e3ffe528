"""How big each scenario runs: the issue's full set-up, ``--quick`` (a few minutes on 2 cores) and a CI size.

The full sizes are the seed reports' and the issue's; the smaller ones keep every code path (reuse
across requests, growing history, batches of several sessions) and only cut counts.
``CHATKV_BENCH_TINY=1`` together with ``--quick`` selects the CI size used by the test suite.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

TINY_ENV = "CHATKV_BENCH_TINY"


@dataclass(frozen=True)
class Sizes:
    label: str
    # seed: 5 unique prompts, each repeated
    seed_repeats: int
    seed_new_tokens: int
    # multiturn: one conversation
    multiturn_turns: int
    multiturn_new_tokens: int
    # batching: sessions per level, new tokens per session, the level compared with sequential
    batching_levels: tuple[int, ...]
    batching_headline: int
    batching_new_tokens: int
    # memory: conversation lengths whose peak RSS and budget fit are measured
    memory_session_tokens: tuple[int, ...]
    # limits: the big tensor read for bandwidth, and the decode run compared with the ceilings
    limits_read_mib: int
    limits_decode_tokens: int
    limits_batch_sessions: int
    limits_rounds: int  # single-session decode is timed this often on each side, best kept (as for the ceilings)
    # snapshot: length of the conversation restored from disk, and how often each side is timed
    snapshot_tokens: int
    snapshot_repeats: int
    # branching: length of the conversation that is regenerated, edited and forked, and how often each is timed
    branching_tokens: int
    branching_repeats: int


FULL = Sizes(
    label="full",
    seed_repeats=4, seed_new_tokens=50,
    multiturn_turns=12, multiturn_new_tokens=64,
    batching_levels=(1, 2, 4, 8, 16), batching_headline=8, batching_new_tokens=100,
    memory_session_tokens=(1024, 4096),
    limits_read_mib=512, limits_decode_tokens=64, limits_batch_sessions=16, limits_rounds=3,
    snapshot_tokens=1600, snapshot_repeats=3,
    branching_tokens=1600, branching_repeats=3,
)

QUICK = Sizes(
    label="quick",
    seed_repeats=2, seed_new_tokens=16,
    multiturn_turns=4, multiturn_new_tokens=16,
    batching_levels=(1, 2, 4, 8), batching_headline=8, batching_new_tokens=16,
    memory_session_tokens=(1024,),
    limits_read_mib=256, limits_decode_tokens=32, limits_batch_sessions=8, limits_rounds=2,
    snapshot_tokens=1600, snapshot_repeats=2,
    branching_tokens=1600, branching_repeats=2,
)

TINY = Sizes(
    label="tiny",
    seed_repeats=2, seed_new_tokens=4,
    multiturn_turns=3, multiturn_new_tokens=4,
    batching_levels=(1, 2, 4), batching_headline=4, batching_new_tokens=4,
    memory_session_tokens=(256,),
    limits_read_mib=128, limits_decode_tokens=4, limits_batch_sessions=4, limits_rounds=1,
    snapshot_tokens=1600, snapshot_repeats=1,
    branching_tokens=1000, branching_repeats=1,
)


def choose_sizes(quick: bool) -> Sizes:
    if quick and os.environ.get(TINY_ENV, "") not in ("", "0"):
        return TINY
    return QUICK if quick else FULL
