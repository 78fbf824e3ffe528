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
    blocks = 96
    key_cache = torch.randn(blocks * BLOCK, kv_heads, head_dim, generator=generator).to(dtype)
    value_cache = torch.randn(blocks * BLOCK, kv_heads, head_dim, generator=generator).to(dtype)
    width = max(-(-n // BLOCK) for n in lengths)
    scattered = rng.sample(range(blocks), width * len(lengths))  # as in a busy pool; no block in two tables
    tables = torch.tensor(scattered).view(len(lengths), width)
    total = len(lengths) + 3  # the decode rows sit among other rows of the packed step, out of order
    rows = torch.tensor(rng.sample(range(total), len(lengths)))
    # the engine hands the query as a transposed view of [heads, T, head_dim]
    query = (torch.randn(heads, total, head_dim, generator=generator) * 3).to(dtype).transpose(0, 1)
    output = torch.zeros(total, heads, head_dim, dtype=dtype)
    scale = head_dim**-0.5
    # each token's own key and value arrive with the query; its slot in the pool is blank until the kernel stores it
    own_slots = [table[(n - 1) // BLOCK] * BLOCK + (n - 1) % BLOCK for table, n in zip(tables.tolist(), lengths)]
    new_keys = torch.randn(total, kv_heads, head_dim, generator=generator).to(dtype)
    new_values = torch.randn(total, kv_heads, head_dim, generator=generator).to(dtype)
    new_keys[rows], new_values[rows] = key_cache[own_slots], value_cache[own_slots]
    pool_keys, pool_values = in_blocks(key_cache.index_fill(0, torch.tensor(own_slots), 0),
                                       value_cache.index_fill(0, torch.tensor(own_slots), 0))
    kernel(query, new_keys, new_values, pool_keys, pool_values, tables, torch.tensor(lengths), rows, output, scale)
    expected = reference(query, key_cache, value_cache, tables, torch.tensor(lengths), rows, scale)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(output[rows].float(), expected[rows], atol=tolerance, rtol=tolerance)
    untouched = [r for r in range(total) if r not in rows.tolist()]
    assert not output[untouched].any(), "rows that are not decode rows must be left alone"
    stored_keys, stored_values = in_blocks(key_cache, value_cache)  # the new tokens stored, bit for bit, nothing else
    assert torch.equal(pool_keys, stored_keys) and torch.equal(pool_values, stored_values)


def test_kernel_says_which_shapes_it_serves_and_the_engine_falls_back_for_the_rest(kernel):
    from chatkv.engine.paged_kernel import decode_kernel_for

    assert decode_kernel_for(9, 3, 64, BLOCK)[0] is kernel  # SmolLM2
    for heads, kv_heads, head_dim, block in [(6, 2, 24, 16), (9, 1, 64, 16), (9, 3, 64, 8), (9, 3, 96, 16)]:
        op, reason = decode_kernel_for(heads, kv_heads, head_dim, block)
        assert op is None and f"head_dim {head_dim}" in reason
        query, key = torch.zeros(1, heads, head_dim), torch.zeros(1, kv_heads, head_dim)
        one = torch.ones(1, dtype=torch.long)
        with pytest.raises(RuntimeError, match="does not serve these shapes"):
            kernel(query, key, key, *blank_caches(1, kv_heads, head_dim, block), torch.zeros(1, 1, dtype=torch.long), one,
                   one - 1, query.clone(), 0.125)


def test_kernel_refuses_what_it_cannot_read(kernel):
    keys, values = blank_caches(1, 1, 64)
    query, new = torch.zeros(1, 2, 64), torch.zeros(1, 1, 64)
    one = torch.ones(1, dtype=torch.long)
    table = torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="float32 and bfloat16"):
        kernel(query.half(), new.half(), new.half(), keys.half(), values.half(), table, one, one - 1, query.half(), 0.125)
    with pytest.raises(RuntimeError, match="contiguous"):
        strided = blank_caches(2, 2, 64)[0][:, :1]  # one head of a two-head cache: not contiguous
        kernel(query, new, new, strided, values, table, one, one - 1, query, 0.125)
    with pytest.raises(RuntimeError, match="key_cache must be"):  # token-major keys, the layout of old pools
        kernel(query, new, new, torch.zeros(BLOCK, 1, 64), values, table, one, one - 1, query.clone(), 0.125)
    with pytest.raises(RuntimeError, match="KV heads"):  # the new keys must have the caches' heads
        kernel(query, torch.zeros(1, 2, 64), torch.zeros(1, 2, 64), keys, values, table, one, one - 1, query.clone(), 0.125)
    with pytest.raises(RuntimeError, match="beyond its block table"):  # 17 keys, one 16-token block
        kernel(query, new, new, keys, values, table, one * 17, one - 1, query.clone(), 0.125)
    with pytest.raises(RuntimeError, match="outside the query"):
        kernel(query, new, new, keys, values, table, one, one, query.clone(), 0.125)
    with pytest.raises(RuntimeError, match="outside the pool"):
        kernel(query, new, new, keys, values, table + 1, one, one - 1, query.clone(), 0.125)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_write_op_stores_the_bits_torch_stores_and_skips_the_rows_the_kernel_stores(kernel, dtype):
    from chatkv.engine.kv_blocks import WriteRows, write_tokens

    generator = torch.Generator().manual_seed(7)
    key = torch.randn(6, 3, 4, 64, generator=generator).to(dtype)[:, :, 1]  # strided rows, as the step hands them
    value = torch.randn(6, 3, 64, generator=generator).to(dtype)
    slots = torch.tensor([5, 17, -1, 40, 41, -1])  # -1: a decode row, stored by the decode kernel
    stored = [0, 1, 3, 4]
    by_torch = blank_caches(4, 3, 64, dtype=dtype)
    write_tokens(*by_torch, key[stored], value[stored], WriteRows.for_slots(slots[stored], 3, 64, BLOCK, 4 // key.element_size()))
    by_op = blank_caches(4, 3, 64, dtype=dtype)
    torch.ops.chatkv.paged_kv_write(key, value, *by_op, slots)
    assert torch.equal(by_op[0], by_torch[0]) and torch.equal(by_op[1], by_torch[1])
    with pytest.raises(RuntimeError, match="outside the pool"):
        torch.ops.chatkv.paged_kv_write(key, value, *by_op, slots - 1)  # -2 is no slot


@pytest.mark.parametrize("with_kernel", [True, False])
def test_a_mixed_step_stores_every_row_once_whoever_attends_it(kernel, with_kernel):
    """Decode rows stored by the kernel, the prefill chunk by the write op (or all by torch without the kernel)."""
    from chatkv.engine.attention import PackedStep, Segment, attend
    from chatkv.engine.kv_blocks import read_blocks
    from chatkv.engine.paged_kernel import kv_write_kernel

    pool = torch.zeros(1, 2, 6, 3, BLOCK * 64)  # one layer, six blocks, SmolLM2's heads
    segments = [Segment([0, 1], start=0, length=1, past=20), Segment([2], start=1, length=5, past=0),
                Segment([3], start=6, length=1, past=3)]
    step = PackedStep.build(pool, segments, BLOCK, torch.float32, kernel if with_kernel else None,
                            kv_write_kernel() if with_kernel else None)
    generator = torch.Generator().manual_seed(3)
    query = torch.randn(7, 9, 64, generator=generator)
    key, value = torch.randn(7, 3, 64, generator=generator), torch.randn(7, 3, 64, generator=generator)
    module = type("Layer", (), {"layer_idx": 0})()
    attend(module, query, key, value, None, step)
    for segment in segments:
        got = read_blocks(pool, torch.tensor(segment.block_table), BLOCK, segment.past + segment.length)[0]
        new = slice(segment.start, segment.start + segment.length)
        assert torch.equal(got[0, :, segment.past:], key[new].transpose(0, 1))
        assert torch.equal(got[1, :, segment.past:], value[new].transpose(0, 1))
