"""The background engine: per-session KV reuse, batched prefill and decode, a bounded LRU store, metrics.

``Engine`` is imported on first use (PEP 562), so ``chatkv.engine.api`` -- what the UI needs -- never pulls in torch.
"""

from chatkv.engine.api import (
    EngineError,
    EngineStats,
    QueueFullError,
    Sampling,
    SessionStats,
    TokenEvent,
    TurnHandle,
    TurnResult,
)

__all__ = [
    "Engine",
    "EngineError",
    "EngineStats",
    "QueueFullError",
    "Sampling",
    "SessionStats",
    "TokenEvent",
    "TurnHandle",
    "TurnResult",
]


def __getattr__(name: str):
    if name == "Engine":
        from chatkv.engine.engine import Engine

        return Engine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
