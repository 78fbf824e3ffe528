"""Quantized weights computed once per model and mode, cached as safetensors beside the converted checkpoints.

The file holds the portable quantized values (int8 levels and scales; int4 levels, scales and mins),
not a kernel's packed layout, so the cache does not depend on the CPU it was written on. Its header
names the model, config hash, mode and the checkpoint files it was computed from (name, size,
mtime); any mismatch, or an unreadable file, means quantizing again and replacing it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

CACHE_FORMAT = "chatkv-quantized-weights/1"


def _checkpoint_files(source_path: str) -> list[Path]:
    folder = Path(source_path)
    return sorted(folder.glob("*.safetensors")) if folder.is_dir() else []


def _source_tag(files: list[Path]) -> str:
    return json.dumps([[file.name, file.stat().st_size, file.stat().st_mtime_ns] for file in files])


def _read_state(files: list[Path]) -> dict[str, torch.Tensor] | None:
    """The checkpoint's tensors in float32 (the converted SmolLM2 checkpoint is fp32: the GGUF dequantized)."""
    from safetensors.torch import load_file

    if not files:
        return None
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update({name: tensor.float() for name, tensor in load_file(file).items()})
    return state


def load_or_quantize(
    model: Any, quant: str, source: Any, config_hash: str, cache_dir: Path, progress: Callable[[str], None]
) -> dict[str, torch.Tensor]:
    """The quantized tensors for ``model`` in mode ``quant``: from the cache if it matches, else computed and cached."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from chatkv.model.lean_llama import quantize_model

    files = _checkpoint_files(source.path)
    expected = {
        "format": CACHE_FORMAT,
        "model_id": source.model_id,
        "config_hash": config_hash,
        "quant": quant,
        "source": _source_tag(files),
    }
    safe_id = source.model_id.replace("/", "--")
    path = cache_dir / f"{safe_id}-{config_hash}-{quant}.safetensors"
    if path.is_file():
        try:
            with safe_open(path, framework="pt") as handle:
                if handle.metadata() == expected:
                    # clone: the tensors must not outlive the file mapping behind them
                    return {name: handle.get_tensor(name).clone() for name in handle.keys()}
        except Exception:  # noqa: BLE001 - a damaged cache file is recomputed, never trusted
            pass
    progress(f"Quantizing {source.model_id} to {quant} (once; cached in {cache_dir})…")
    tensors = quantize_model(model, quant, _read_state(files))
    cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    handle, partial = tempfile.mkstemp(prefix=f".{path.name}.", dir=cache_dir)
    os.close(handle)
    try:
        save_file(tensors, partial, metadata=expected)
        os.replace(partial, path)
    except OSError as exc:  # a read-only cache costs time at the next load, not this load
        progress(f"Could not cache the quantized weights in {cache_dir}: {exc}")
        Path(partial).unlink(missing_ok=True)
    return tensors
