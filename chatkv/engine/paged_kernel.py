"""The CPU decode-attention kernel (``paged_decode.cpp``): built once per machine, loaded on demand.

Decode attention over the paged pool is mostly reading keys and values. Gathering each session's
blocks into a padded batch and calling SDPA reads them three times (gather, write, attend) and pays
SDPA's per-batch overhead on tiny queries; the kernel reads each key and value once, in place,
through the block table. It is compiled with torch's own C++ extension builder (a C++ compiler and
ninja on PATH), into torch's extension cache, the first time an engine starts on a CPU; later starts
load the built library in well under a second.

Where it cannot be built (no compiler, another platform), does not serve the model's shape or the CPU
(it is written for AVX-512; ``decode_kernel_for`` says), or ``CHATKV_DECODE_KERNEL=off`` is set,
attention falls back to gather + SDPA, which gives the same tokens (both compute in float32 where it
matters) but runs slower.
"""

from __future__ import annotations

import os
import platform
import threading
from pathlib import Path
from typing import Callable

import torch

SOURCE = Path(__file__).with_name("paged_decode.cpp")
NAME = "chatkv_paged_decode"
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


def decode_kernel_for(heads: int, kv_heads: int, head_dim: int, block_size: int,
                      progress: Callable[[str], None] | None = None) -> tuple[Callable | None, str | None]:
    """The kernel if it serves a model of this shape on this CPU, else None and the reason. Never raises."""
    op = decode_kernel(progress)
    if op is None:
        return None, unavailable_reason()
    if not torch.ops.chatkv.paged_decode_supported(heads, kv_heads, head_dim, block_size):
        return None, (f"the CPU attention kernel needs AVX-512, head_dim 16/32/64/128 and at most 8 query heads per "
                      f"KV head (this model: {heads} heads, {kv_heads} KV heads, head_dim {head_dim})")
    return op, None


def unavailable_reason() -> str | None:
    return _state.get("error")  # type: ignore[return-value]


def _load(progress: Callable[[str], None]):
    if os.environ.get("CHATKV_DECODE_KERNEL", "").lower() in ("0", "off", "false", "no"):
        return None, "turned off by CHATKV_DECODE_KERNEL"
    try:
        from torch.utils import cpp_extension

        flags = ["-O3", "-march=native"]
        if platform.machine() in ("x86_64", "AMD64"):
            # gcc 12 may emit AMX tile instructions for -march=native that this CPU family faults on
            flags += ["-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"]
        flags += ["-fopenmp"] if platform.system() == "Linux" else []
        if _needs_build(cpp_extension):
            progress("compiling the CPU attention kernel (once per machine, a few seconds)…")
        cpp_extension.load(
            name=NAME,
            sources=[str(SOURCE)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"] if platform.system() == "Linux" else [],
            is_python_module=False,
            verbose=False,
        )
        return torch.ops.chatkv.paged_decode_attention, None
    except Exception as exc:  # noqa: BLE001 - any build or load failure means: use the fallback
        return None, f"could not build the CPU attention kernel ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"


def _needs_build(cpp_extension) -> bool:
    """Whether no library was built yet on this machine: only then is the first start worth a note to the user.

    (After an upgrade that changes the source, torch rebuilds it without a note: a few seconds once.)
    """
    try:
        return not (Path(cpp_extension._get_build_directory(NAME, verbose=False)) / f"{NAME}.so").exists()
    except Exception:  # noqa: BLE001 - a private torch helper; if it moves, say nothing rather than fail
        return False
