"""The ``machine`` object of the bench JSON: what ran the figures, so runs on different machines are not confused."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> list[str]:
    """The instruction-set flags that decide how fast bf16 and fp32 matmuls can be."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni")
    return [flag for flag in wanted if flag in flags]


def machine_info(bundle: Any) -> dict[str, Any]:
    import transformers

    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_features": cpu_features(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "dtype": str(bundle.dtype).removeprefix("torch."),
        "device": str(bundle.device),
        "model": bundle.model_id,
        "model_fingerprint": bundle.fingerprint.as_string(),
        "parameters": sum(p.numel() for p in bundle.model.parameters()),
    }
