"""chatkv's C++ CPU kernels: built once per machine with torch's extension builder, loaded on demand.

- ``paged_decode.cpp``: decode attention read in place from the paged KV pool (``torch.ops.chatkv.paged_decode_attention``;
  ``chatkv.engine.paged_kernel`` says when the engine uses it).
- ``int8_linear.cpp``: an int8 weight-only linear map for 1 to 8 rows (``torch.ops.chatkv.int8_linear``), the
  output head of a quantized model in a decode step.

Both are written for AVX-512. They are compiled together into one library (a C++ compiler and ninja on
PATH), into torch's extension cache, the first time they are needed; later starts load it in well
under a second. Where that fails (no compiler, another platform) or ``CHATKV_DECODE_KERNEL=off`` is set,
``load`` says why and the callers keep torch's own ops, which give the same tokens, slower.
"""

from __future__ import annotations

import os
import platform
import threading
from pathlib import Path
from typing import Callable

SOURCES = [Path(__file__).with_name("paged_decode.cpp"), Path(__file__).with_name("int8_linear.cpp")]
NAME = "chatkv_cpu_kernels"
_lock = threading.Lock()
_state: dict[str, object] = {}  # "error": why the kernels are not there (None once loaded)


def load(progress: Callable[[str], None] | None = None) -> str | None:
    """Build (first time only) and load the kernels; None once they are registered under ``torch.ops.chatkv``,
    else the reason they are not. Never raises; the work is done once per process."""
    with _lock:
        if "error" not in _state:
            _state["error"] = _build(progress or (lambda message: None))
        return _state["error"]  # type: ignore[return-value]


def unavailable_reason() -> str | None:
    """Why ``load`` failed, if it was called and did."""
    return _state.get("error")  # type: ignore[return-value]


def _build(progress: Callable[[str], None]) -> str | None:
    if os.environ.get("CHATKV_DECODE_KERNEL", "").lower() in ("0", "off", "false", "no"):
        return "turned off by CHATKV_DECODE_KERNEL"
    try:
        from torch.utils import cpp_extension

        flags = ["-O3", "-march=native"]
        if platform.machine() in ("x86_64", "AMD64"):
            # gcc 12 may emit AMX tile instructions for -march=native that this CPU family faults on
            flags += ["-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"]
        flags += ["-fopenmp"] if platform.system() == "Linux" else []
        if _needs_build(cpp_extension):
            progress("compiling chatkv's CPU kernels (once per machine, up to a minute)…")
        cpp_extension.load(
            name=NAME,
            sources=[str(source) for source in SOURCES],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"] if platform.system() == "Linux" else [],
            is_python_module=False,
            verbose=False,
        )
        return None
    except Exception as exc:  # noqa: BLE001 - any build or load failure means: use torch's own ops
        return f"could not build chatkv's CPU kernels ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"


def _needs_build(cpp_extension) -> bool:
    """Whether no library was built yet on this machine: only then is the first start worth a note to the user.

    (After an upgrade that changes a source, torch rebuilds it without a note: a few seconds once.)
    """
    try:
        return not (Path(cpp_extension._get_build_directory(NAME, verbose=False)) / f"{NAME}.so").exists()
    except Exception:  # noqa: BLE001 - a private torch helper; if it moves, say nothing rather than fail
        return False
