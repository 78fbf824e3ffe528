"""The engine's thread policy: one core left to the rest of the machine unless --threads says otherwise; the stats say so."""

from __future__ import annotations

import torch

from chatkv.config import Settings
from chatkv.engine import Engine
from chatkv.engine.threads import available_cores, engine_threads


def test_policy_leaves_one_core_free_and_an_explicit_count_wins() -> None:
    assert engine_threads(0) == max(1, available_cores() - 1)
    assert engine_threads(3) == 3


def test_engine_thread_computes_with_the_policy_count_and_reports_it(tiny_bundle) -> None:
    for requested in (0, 1):
        settings = Settings()
        settings.model.threads = requested
        engine = Engine(tiny_bundle, settings).start()
        try:
            in_engine = engine.call_in_engine(torch.get_num_threads).result(30)
            stats = engine.stats()
        finally:
            engine.close()
        assert in_engine == stats.threads == engine_threads(requested)
        assert stats.weights == "float32"
