"""The CPU decode-attention kernel against plain attention over each sequence's keys, and the engine's use of it."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from chatkv.engine.paged_kernel import decode_kernel, unavailable_reason

BLOCK = 16


@pytest.fixture(scope="module")
def kernel():
    op = decode_kernel()
    if op is None:
        pytest.skip(f"the decode kernel is not available here: {unavailable_reason()}")
    return op


def in_blocks(key_slots, value_slots):
    """Token-major caches ``[blocks * BLOCK, kv_heads, head_dim]`` in the pool's block layout (see kv_blocks)."""
    slots, kv_heads, head_dim = key_slots.shape
    pack = 4 // key_slots.element_size()
    keys = key_slots.view(slots // BLOCK, BLOCK, kv_heads, head_dim // pack, pack).permute(0, 2, 3, 1, 4).contiguous()
    values = value_slots.view(slots // BLOCK, BLOCK, kv_heads, head_dim).transpose(1, 2).contiguous()
    return keys, values


def blank_caches(blocks, kv_heads, head_dim, block=BLOCK, dtype=torch.float32):
    pack = 4 // torch.empty((), dtype=dtype).element_size()
    return (torch.zeros(blocks, kv_heads, head_dim // pack, block, pack, dtype=dtype),
            torch.zeros(blocks, kv_heads, block, head_dim, dtype=dtype))


def reference(query, key_cache, value_cache, tables, lengths, rows, scale):
    """Each sequence alone: its slots gathered in order from token-major caches, float32 SDPA, query heads
    grouped onto KV heads."""
    heads, kv_heads = query.shape[1], key_cache.shape[1]
    out = torch.zeros(query.shape, dtype=torch.float32)
    for sequence, (table, length, row) in enumerate(zip(tables.tolist(), lengths.tolist(), rows.tolist())):
        slots = [table[t // BLOCK] * BLOCK + t % BLOCK for t in range(length)]
        keys = key_cache[slots].float().transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
        values = value_cache[slots].float().transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
        q = query[row].float().unsqueeze(1)  # [heads, 1, head_dim]
        out[row] = F.scaled_dot_product_attention(q, keys, values, scale=scale).squeeze(1)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,heads,kv_heads", [(64, 9, 3), (16, 4, 2), (128, 8, 1), (32, 4, 4), (64, 16, 2)])
def test_kernel_matches_attention_over_each_sequence(kernel, dtype, head_dim, heads, kv_heads):
    rng = random.Random(head_dim * heads)
    generator = torch.Generator().manual_seed(heads)
    lengths = [1, 15, 16, 17, 33, 200]
    blocks = 64
    key_cache = torch.randn(blocks * BLOCK, kv_heads, head_dim, generator=generator).to(dtype)
    value_cache = torch.randn(blocks * BLOCK, kv_heads, head_dim, generator=generator).to(dtype)
    width = max(-(-n // BLOCK) for n in lengths)
    tables = torch.tensor([rng.sample(range(blocks), width) for _ in lengths])  # scattered, as in a busy pool
    total = len(lengths) + 3  # the decode rows sit among other rows of the packed step, out of order
    rows = torch.tensor(rng.sample(range(total), len(lengths)))
    # the engine hands the query as a transposed view of [heads, T, head_dim]
    query = (torch.randn(heads, total, head_dim, generator=generator) * 3).to(dtype).transpose(0, 1)
    output = torch.zeros(total, heads, head_dim, dtype=dtype)
    scale = head_dim**-0.5
    kernel(query, *in_blocks(key_cache, value_cache), tables, torch.tensor(lengths), rows, output, scale)
    expected = reference(query, key_cache, value_cache, tables, torch.tensor(lengths), rows, scale)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(output[rows].float(), expected[rows], atol=tolerance, rtol=tolerance)
    untouched = [r for r in range(total) if r not in rows.tolist()]
    assert not output[untouched].any(), "rows that are not decode rows must be left alone"


def test_kernel_says_which_shapes_it_serves_and_the_engine_falls_back_for_the_rest(kernel):
    from chatkv.engine.paged_kernel import decode_kernel_for

    assert decode_kernel_for(9, 3, 64, BLOCK)[0] is kernel  # SmolLM2
    for heads, kv_heads, head_dim, block in [(6, 2, 24, 16), (9, 1, 64, 16), (9, 3, 64, 8), (9, 3, 96, 16)]:
        op, reason = decode_kernel_for(heads, kv_heads, head_dim, block)
        assert op is None and f"head_dim {head_dim}" in reason
        query = torch.zeros(1, heads, head_dim)
        one = torch.ones(1, dtype=torch.long)
        with pytest.raises(RuntimeError, match="does not serve these shapes"):
            kernel(query, *blank_caches(1, kv_heads, head_dim, block), torch.zeros(1, 1, dtype=torch.long), one, one - 1,
                   query.clone(), 0.125)


def test_kernel_refuses_what_it_cannot_read(kernel):
    keys, values = blank_caches(1, 1, 64)
    query = torch.zeros(1, 2, 64)
    one = torch.ones(1, dtype=torch.long)
    table = torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="float32 and bfloat16"):
        kernel(query.half(), keys.half(), values.half(), table, one, one - 1, query.half(), 0.125)
    with pytest.raises(RuntimeError, match="contiguous"):
        strided = blank_caches(2, 2, 64)[0][:, :1]  # one head of a two-head cache: not contiguous
        kernel(query, strided, values, table, one, one - 1, query, 0.125)
    with pytest.raises(RuntimeError, match="key_cache must be"):  # token-major keys, the layout of old pools
        kernel(query, torch.zeros(BLOCK, 1, 64), values, table, one, one - 1, query.clone(), 0.125)
    with pytest.raises(RuntimeError, match="beyond its block table"):  # 17 keys, one 16-token block
        kernel(query, keys, values, table, one * 17, one - 1, query.clone(), 0.125)
    with pytest.raises(RuntimeError, match="outside the query"):
        kernel(query, keys, values, table, one, one, query.clone(), 0.125)
    with pytest.raises(RuntimeError, match="outside the pool"):
        kernel(query, keys, values, table + 1, one, one - 1, query.clone(), 0.125)


def test_step_gives_decode_rows_to_the_kernel_and_falls_back_without_it(kernel):
    from chatkv.engine.attention import PackedStep, Segment

    kv = torch.zeros(2, 2, 4, 2, BLOCK * 16)
    decode = Segment([0, 1], start=0, length=1, past=20)
    prefill = Segment([2], start=1, length=5, past=0)
    with_kernel = PackedStep.build(kv, [decode, prefill], BLOCK, torch.float32, kernel)
    assert with_kernel.decode_rows is not None and len(with_kernel.batches) == 1  # prefill still gathers
    assert with_kernel.decode_rows.context_lens.tolist() == [21]
    without = PackedStep.build(kv, [decode, prefill], BLOCK, torch.float32, None)
    assert without.decode_rows is None and len(without.batches) == 2


def test_a_built_step_leaves_no_reference_to_its_pool_behind():
    """The store replaces its pool when it grows; nothing the steps built may keep the old one in memory."""
    import gc
    import weakref

    from chatkv.engine.attention import PackedStep, Segment

    pool = torch.zeros(2, 2, 4, 2, BLOCK * 16)
    step = PackedStep.build(pool, [Segment([0, 1], start=0, length=1, past=20)], BLOCK, torch.float32, decode_kernel())
    assert step.layer_caches[1][1].data_ptr() == pool[1, 1].data_ptr()  # a view, not a copy
    alive = weakref.ref(pool)
    del pool, step
    gc.collect()
    assert alive() is None
