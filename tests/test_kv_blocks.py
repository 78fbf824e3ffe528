"""The pool's block layout: what goes in at a session's positions comes back out, and sits where the kernel reads it."""

from __future__ import annotations

import pytest
import torch

from chatkv.config import KvOptions
from chatkv.engine.kv_blocks import KvLayout, layer_caches
from chatkv.engine.kv_store import KvStore


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_written_at_any_position_reads_back_bit_for_bit(dtype):
    layout = KvLayout(layers=3, kv_heads=2, head_dim=8)
    store = KvStore(layout, dtype, torch.device("cpu"), KvOptions(), block_size=16)
    store.reserve("filler", 40)  # the session's blocks are not the pool's first ones
    entry = store.reserve("a", 37)
    kv = torch.randn(3, 2, 2, 37, 8).to(dtype)
    store.write(entry, 0, kv[:, :, :, :21])
    store.write(entry, 21, kv[:, :, :, 21:])  # from inside a block
    store.commit("a", list(range(37)))
    assert torch.equal(store.session_kv(entry), kv)


def test_a_block_keeps_keys_dimension_major_and_values_token_major():
    """The layout the CPU decode kernel reads: dimension d of position i at [block, head, d // pack, i, d % pack]
    for keys, at [block, head, i, d] for values."""
    layout = KvLayout(layers=1, kv_heads=2, head_dim=4)
    store = KvStore(layout, torch.bfloat16, torch.device("cpu"), KvOptions(), block_size=16)
    entry = store.reserve("a", 20)
    kv = torch.arange(2 * 2 * 20 * 4, dtype=torch.float32).view(1, 2, 2, 20, 4).bfloat16()  # exact in bfloat16
    store.write(entry, 0, kv)
    keys, values = layer_caches(store.kv, 16)[0]
    assert keys.shape == (len(store.blocks), 2, 2, 16, 2) and values.shape == (len(store.blocks), 2, 16, 4)
    block = entry.block_table[1]  # token 17 is position 1 of the second block
    for head in range(2):
        for dim in range(4):
            assert keys[block, head, dim // 2, 1, dim % 2] == kv[0, 0, head, 17, dim]
        assert torch.equal(values[block, head, 1], kv[0, 1, head, 17])
