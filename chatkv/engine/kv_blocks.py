"""How a block of the KV pool holds its keys and values, and moving KV into and out of that layout.

The pool is one tensor ``[layers, 2, blocks, kv_heads, block_size * head_dim]`` (0 = keys, 1 = values),
so one KV head's part of one block is one contiguous run of memory. ``pack`` is how many 16- or 32-bit
elements share a 32-bit word: 1 for float32, 2 for bfloat16 and float16. Within a run:

- keys are dimension-major, ``[head_dim / pack, block_size, pack]``: sixteen consecutive keys of one
  (pair of) dimension(s) fill one 64-byte line, so the CPU decode kernel (``chatkv/kernels/paged_decode.cpp``)
  grows sixteen scores side by side, one multiply-add per line, with no horizontal sums;
- values are token-major, ``[block_size, head_dim]``: the weighted sum adds whole rows.

Everything outside the pool sees KV token-major, ``[..., kv_heads, tokens, head_dim]``: snapshots, the
gather + SDPA path, tests. The functions here convert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KvLayout:
    """The model's KV shape: what one token costs, whatever the pool's block size."""

    layers: int
    kv_heads: int
    head_dim: int

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * torch.empty((), dtype=dtype).element_size()

    def pool_shape(self, blocks: int, block_size: int) -> tuple[int, ...]:
        return (self.layers, 2, blocks, self.kv_heads, block_size * self.head_dim)


def key_pack(dtype: torch.dtype) -> int:
    """Key dimensions in one 32-bit word: 1 for float32, 2 for 16-bit dtypes."""
    return max(1, 4 // torch.empty((), dtype=dtype).element_size())


def layer_caches(pool: torch.Tensor, block_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, views of the pool: keys ``[blocks, kv_heads, head_dim / pack, block_size, pack]`` and
    values ``[blocks, kv_heads, block_size, head_dim]``.

    Made per step rather than kept: views held on the pool would keep a grown-out-of pool alive.
    """
    return [_as_blocks(kv[0], kv[1], block_size) for kv in pool.unbind(0)]


def _as_blocks(keys: torch.Tensor, values: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of ``[..., blocks, kv_heads, block_size * head_dim]`` runs in the key and the value layout."""
    *outer, blocks, kv_heads, run = keys.shape
    head_dim, pack = run // block_size, key_pack(keys.dtype)
    return (keys.view(*outer, blocks, kv_heads, head_dim // pack, block_size, pack),
            values.view(*outer, blocks, kv_heads, block_size, head_dim))


def block_slots(block_table: list[int], start: int, stop: int, block_size: int) -> torch.Tensor:
    """Pool slots of positions ``[start, stop)`` of a sequence with ``block_table``: int64 ``[stop - start]``,
    slot ``b * block_size + i`` being position ``i`` of block ``b``."""
    positions = torch.arange(start, stop)
    table = torch.tensor(block_table, dtype=torch.long)
    return table[positions // block_size] * block_size + positions % block_size


@dataclass(frozen=True)
class WriteRows:
    """Where tokens' K/V go in one layer's caches, in the order of a ``[tokens, kv_heads, head_dim]`` input:
    ``keys``, int64 ``[tokens * kv_heads * head_dim]`` elements of the key cache's flat view; ``values``,
    int64 ``[tokens * kv_heads]`` rows of ``head_dim`` elements of the value cache."""

    keys: torch.Tensor
    values: torch.Tensor

    @classmethod
    def for_slots(cls, slots: torch.Tensor, kv_heads: int, head_dim: int, block_size: int, pack: int) -> "WriteRows":
        """``slots`` int64 ``[tokens]``: slot ``b * block_size + i`` is position ``i`` of block ``b``."""
        device = slots.device
        block, offset = (slots // block_size).view(-1, 1, 1), (slots % block_size).view(-1, 1, 1)
        head = torch.arange(kv_heads, device=device).view(1, -1, 1)
        dim = torch.arange(head_dim, device=device).view(1, 1, -1)
        run = (block * kv_heads + head) * (block_size * head_dim)  # [tokens, kv_heads, 1]: where the head's run starts
        keys = run + ((dim // pack) * block_size + offset) * pack + dim % pack
        values = (block * kv_heads + head) * block_size + offset
        return cls(keys.flatten(), values.flatten())


def write_tokens(key_cache: torch.Tensor, value_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 rows: WriteRows) -> None:
    """Store ``key`` and ``value`` (each ``[tokens, kv_heads, head_dim]``, any strides) where ``rows`` says."""
    head_dim = value.shape[-1]
    key_cache.view(-1).index_copy_(0, rows.keys, key.reshape(-1))
    value_cache.view(-1, head_dim).index_copy_(0, rows.values, value.reshape(-1, head_dim))


def keys_as_tokens(keys: torch.Tensor) -> torch.Tensor:
    """``[..., n, kv_heads, head_dim / pack, block_size, pack]`` blocks as ``[..., kv_heads, n * block_size, head_dim]`` (a copy)."""
    *outer, n, kv_heads, lines, block_size, pack = keys.shape
    # moved as 32-bit words (a pair of 16-bit dimensions each): torch reorders them ~10x faster than halves
    words = (keys.view(torch.int32) if pack == 2 else keys).squeeze(-1)  # [..., n, kv_heads, lines, block_size]
    words = words.transpose(-4, -3).transpose(-2, -1).reshape(*outer, kv_heads, n * block_size, lines)
    return words.view(keys.dtype)


def values_as_tokens(values: torch.Tensor) -> torch.Tensor:
    """``[..., n, kv_heads, block_size, head_dim]`` blocks as ``[..., kv_heads, n * block_size, head_dim]`` (a copy)."""
    *outer, n, kv_heads, block_size, head_dim = values.shape
    return values.transpose(-4, -3).reshape(*outer, kv_heads, n * block_size, head_dim)


def read_blocks(pool: torch.Tensor, block_ids: torch.Tensor, block_size: int, tokens: int) -> torch.Tensor:
    """The first ``tokens`` positions held by ``block_ids`` (in position order), token-major:
    ``[layers, 2, kv_heads, tokens, head_dim]`` (a copy)."""
    blocks = pool.index_select(2, block_ids)  # [layers, 2, n, kv_heads, run]
    keys, values = _as_blocks(blocks[:, 0], blocks[:, 1], block_size)
    return torch.stack([keys_as_tokens(keys)[:, :, :tokens], values_as_tokens(values)[:, :, :tokens]], dim=1)
