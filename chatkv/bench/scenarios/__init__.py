"""The bench's scenarios, one module each; every module has ``run(ctx: BenchContext) -> ScenarioResult``."""

from __future__ import annotations

import importlib
from typing import Callable

# in the order a full run takes them
NAMES = ("seed", "multiturn", "batching", "shared-prefix", "memory", "limits", "snapshot", "speed", "contention", "branching")


def runner(name: str) -> Callable:
    return importlib.import_module(f"chatkv.bench.scenarios.{name.replace('-', '_')}").run
