"""How many torch threads the engine uses.

Measured on a 2-core machine with a CPU-bound neighbour (``chatkv bench contention``): torch's
default of one OpenMP thread per core collapses when another process wants a core, because every op
waits at a barrier for the thread whose core was taken (decode fell to about a quarter of its quiet
rate), while one thread kept about four fifths of it. So the engine leaves one core to the rest of the machine:
``cores - 1`` threads, at least one. ``--threads N`` (config ``[model] threads``) overrides it.
"""

from __future__ import annotations

import os


def available_cores() -> int:
    """CPUs this process may run on (its affinity mask, which containers and ``taskset`` narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def engine_threads(requested: int = 0) -> int:
    """``requested`` if positive, else one less than the available cores (at least one)."""
    if requested > 0:
        return requested
    return max(1, available_cores() - 1)
