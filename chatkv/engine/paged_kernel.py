"""The CPU decode-attention kernel (``paged_decode.cpp``): built once per machine, loaded on demand.

Decode attention over the paged pool is mostly reading keys and values. Gathering each session's
blocks into a padded batch and calling SDPA reads them three times (gather, write, attend) and pays
SDPA's per-batch overhead on tiny queries; the kernel reads each key and value once, in place,
through the block table. It is compiled with torch's own C++ extension builder (a C++ compiler and
ninja on PATH), into torch's extension cache, the first time an engine starts on a CPU; later starts
load the built library in well under a second.

Where it cannot be built (no compiler, another platform) or ``CHATKV_DECODE_KERNEL=off`` is set,
``decode_kernel()`` returns None and attention falls back to gather + SDPA, which gives the same
tokens (both compute in float32 where it matters) but runs slower.
"""

from __future__ import annotations

import os
import platform
import threading
from pathlib import Path
from typing import Callable

import torch

SOURCE = Path(__file__).with_name("paged_decode.cpp")
_lock = threading.Lock()
_state: dict[str, object] = {}  # "op": the loaded op or None, "error": why it is None


def decode_kernel(progress: Callable[[str], None] | None = None):
    """``torch.ops.chatkv.paged_decode_attention``, building it first if needed; None where it is unavailable.

    The reason it is unavailable, if any, is in ``unavailable_reason()``. Never raises.
    """
    with _lock:
        if "op" not in _state:
            _state["op"], _state["error"] = _load(progress or (lambda message: None))
        return _state["op"]


def unavailable_reason() -> str | None:
    return _state.get("error")  # type: ignore[return-value]


def _load(progress: Callable[[str], None]):
    if os.environ.get("CHATKV_DECODE_KERNEL", "").lower() in ("0", "off", "false", "no"):
        return None, "turned off by CHATKV_DECODE_KERNEL"
    try:
        from torch.utils import cpp_extension

        flags = ["-O3", "-march=native", "-ffast-math", "-fno-finite-math-only"]
        if platform.machine() in ("x86_64", "AMD64"):
            # gcc 12 may emit AMX tile instructions for -march=native that this CPU family faults on
            flags += ["-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"]
        flags += ["-fopenmp"] if platform.system() == "Linux" else []
        progress("Preparing the CPU attention kernel (compiled once per machine, a few seconds)…")
        cpp_extension.load(
            name="chatkv_paged_decode",
            sources=[str(SOURCE)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"] if platform.system() == "Linux" else [],
            is_python_module=False,
            verbose=False,
        )
        return torch.ops.chatkv.paged_decode_attention, None
    except Exception as exc:  # noqa: BLE001 - any build or load failure means: use the fallback
        return None, f"could not build the CPU attention kernel ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
