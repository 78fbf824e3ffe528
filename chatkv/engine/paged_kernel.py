"""When the engine attends decode tokens with the paged decode kernel (``chatkv/kernels/paged_decode.cpp``).

Decode attention over the paged pool is mostly reading keys and values. Gathering each session's
blocks into a padded batch and calling SDPA reads them three times (gather, write, attend) and pays
SDPA's per-batch overhead on tiny queries; the kernel reads each key and value once, in place,
through the block table.

Where the kernels cannot be built (``chatkv.kernels``), the kernel does not serve the model's shape or
the CPU (it is written for AVX-512; ``decode_kernel_for`` says), or ``CHATKV_DECODE_KERNEL=off`` is set,
attention falls back to gather + SDPA, which gives the same tokens (both compute in float32 where it
matters) but runs slower.
"""

from __future__ import annotations

from typing import Callable

import torch

from chatkv import kernels


def decode_kernel(progress: Callable[[str], None] | None = None):
    """``torch.ops.chatkv.paged_decode_attention``, building the kernels first if needed; None where unavailable.

    The reason it is unavailable, if any, is in ``unavailable_reason()``. Never raises.
    """
    return None if kernels.load(progress) else torch.ops.chatkv.paged_decode_attention


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


def kv_write_kernel():
    """``torch.ops.chatkv.paged_kv_write`` (stores a step's keys and values in the pool's block layout, on the
    CPU), or None where the kernels are unavailable (then ``kv_blocks.write_tokens`` does it). Never raises."""
    return None if kernels.load() else torch.ops.chatkv.paged_kv_write


def unavailable_reason() -> str | None:
    return kernels.unavailable_reason()
