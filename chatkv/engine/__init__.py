"""The background engine: per-session KV reuse, batched prefill and decode, a bounded LRU store, metrics."""

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
from chatkv.engine.engine import Engine

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
