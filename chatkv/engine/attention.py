"""Packed attention over the paged KV pool: every session of a step in one call per layer.

Every engine step packs the new tokens of all scheduled sessions into one ``[1, T]`` input. The
linear layers run once over all of them; attention (``attend``: called by the lean Llama forward, and
through ``packed_attention``, registered with transformers' ``AttentionInterface``, by the stock
modules) does, per layer:

1. decode tokens (one query per session, or several: the speculative guesses being verified, each its
   own row, as if decoded alone), on the CPU: one call of the paged decode kernel (``paged_decode.cpp``),
   which stores each token's key and value (RoPE already applied) in its pool slot, then reads each
   session's keys and values in place through its block table;
2. the other rows' keys and values go into their pool slots (``kv_blocks``: how a block arranges them):
   one call of the ``paged_kv_write`` kernel on the CPU, else one ``index_copy_`` each;
3. prefill chunks (and decode tokens where the kernel is not available: CUDA, no compiler, a shape
   it does not serve): gather each session's blocks of keys and values through its block table into
   a padded batch (one ``index_select`` over whole blocks, then one reordering copy to token-major;
   indexing single slots is several times slower on the CPU) and run ``scaled_dot_product_attention`` once
   for the whole batch, with an additive mask that hides the padding and keeps prefill causal.
   Decode rows and prefill chunks are padded separately, so a step that mixes both does not pad
   every decode row to the longest chunk.

Every index and mask is built once per step (``PackedStep.build``), on the model's device, so the
layers run without a host round trip. Query heads that share a KV head are folded into that head's
rows, which needs no GQA expansion of the keys.

Calls that do not come from the engine (``model.generate``, the reference, the bench's baselines)
carry no ``PackedStep`` and go to transformers' own SDPA attention with its own masks, so the same
model object stays a stock transformers model for them, even while the engine runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from chatkv.engine.kv_blocks import WriteRows, block_slots, key_pack, keys_as_tokens, layer_caches, values_as_tokens, write_tokens

ATTENTION_NAME = "chatkv_packed"


@dataclass
class Segment:
    """A run of new tokens of one session inside the packed input."""

    block_table: list[int]  # the session's blocks in the pool, in position order (covering past + length)
    start: int  # first position of the segment in the packed input
    length: int  # how many new tokens
    past: int  # tokens already in the session's KV before this step
    # generated tokens (the last one and speculative guesses): each row attends as a decode row does, so a
    # verified guess gets the very logits it would get decoded alone
    decode: bool = False


@dataclass
class AttentionBatch:
    """Segments attended in one SDPA call: queries padded to ``[batch, queries]``, keys to ``[batch, keys]``."""

    batch: int
    queries: int
    query_index: torch.Tensor  # int64 [batch * queries]: packed rows (padding repeats a segment's last row)
    key_blocks: torch.Tensor  # int64 [batch * blocks]: each row's block table, padded with block 0 (masked)
    mask: torch.Tensor  # float [batch, 1, queries, blocks * block_size]: 0 where attended, -inf elsewhere
    real_rows: torch.Tensor  # int64 [n]: rows of the flattened [batch * queries] that are real tokens
    output_index: torch.Tensor  # int64 [n]: the packed rows those outputs go to
    _folded: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def folded_mask(self, groups: int) -> torch.Tensor:
        """The mask for queries folded as ``[batch, kv_heads, groups * queries]`` (built by the first layer)."""
        mask = self._folded.get(groups)
        if mask is None:
            b, _, q, k = self.mask.shape
            mask = self.mask.unsqueeze(2).expand(b, 1, groups, q, k).reshape(b, 1, groups * q, k)
            self._folded[groups] = mask
        return mask


@dataclass
class DecodeRows:
    """Decode tokens attended by the paged decode kernel, straight from the pool."""

    block_tables: torch.Tensor  # int64 [n, widest]: each session's blocks, padded with block 0 (never read)
    context_lens: torch.Tensor  # int64 [n]: keys each token attends over (its own included)
    query_rows: torch.Tensor  # int64 [n]: the token's row in the packed input


@dataclass
class PackedStep:
    """What one forward pass needs to attend over the pool: built once per step, used by every layer."""

    kv: torch.Tensor  # the pool: [layers, 2, blocks, kv_heads, block_size * head_dim] (see kv_blocks)
    block_size: int
    batches: list[AttentionBatch]
    segments: list[Segment]
    decode_rows: DecodeRows | None = None
    decode_kernel: Callable | None = None  # stores and attends the decode rows
    # stores the K/V of the rows the decode kernel does not take: store_kv(key_cache, value_cache, key, value),
    # caches as in layer_caches; None when it takes them all
    store_kv: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None
    layer_caches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # per layer: kv_blocks.layer_caches

    @classmethod
    def build(
        cls, kv: torch.Tensor, segments: list[Segment], block_size: int, mask_dtype: torch.dtype,
        decode_kernel: Callable | None = None, kv_write: Callable | None = None,
    ) -> "PackedStep":
        """Indices and masks for ``segments``; ``decode_kernel`` (``paged_kernel.decode_kernel()``) stores and attends
        the decode rows, ``kv_write`` (``paged_kernel.kv_write_kernel()``, CPU only) stores the other rows' K/V."""
        device = kv.device
        decode = [s for s in segments if s.length == 1 or s.decode]
        prefill = [s for s in segments if not (s.length == 1 or s.decode)]
        decode_rows = None
        if decode and decode_kernel is not None and device.type == "cpu" and kv.dtype in KERNEL_DTYPES:
            decode_rows, decode = _decode_rows(decode, block_size), []
        batches = [_batch(group, block_size, mask_dtype, device) for group in (decode, prefill) if group]
        store_kv = _kv_store(kv, segments, decode_rows, block_size, kv_write)
        return cls(kv, block_size, batches, segments, decode_rows, decode_kernel if decode_rows else None,
                   store_kv, layer_caches(kv, block_size))


KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _kv_store(kv: torch.Tensor, segments: list[Segment], kernel_rows: DecodeRows | None, block_size: int,
              kv_write: Callable | None) -> Callable | None:
    """``store_kv`` for the packed rows the decode kernel does not store (None if it stores them all)."""
    # int64 [T], in packed order
    slot_mapping = torch.cat([block_slots(s.block_table, s.past, s.past + s.length, block_size) for s in segments])
    if kernel_rows is not None:
        # the kernel stores these; rows of a multi-row decode segment are stored here first as well (the kernel
        # writes the same bytes again), since each reads the keys of the rows before it, maybe on another thread
        slot_mapping[torch.tensor([s.start for s in segments if s.length == 1], dtype=torch.long)] = -1
        if bool((slot_mapping < 0).all()):
            return None
    slot_mapping = slot_mapping.to(kv.device)
    if kv_write is not None and kv.device.type == "cpu":
        def store(key_cache, value_cache, key, value):
            kv_write(key, value, key_cache, value_cache, slot_mapping)  # skips the slots of -1
        return store
    keep = (slot_mapping >= 0).nonzero().squeeze(1)
    write_rows = WriteRows.for_slots(slot_mapping[keep], kv.shape[3], kv.shape[4] // block_size, block_size, key_pack(kv.dtype))
    keep = None if len(keep) == len(slot_mapping) else keep

    def store_tokens(key_cache, value_cache, key, value):
        if keep is not None:
            key, value = key.index_select(0, keep), value.index_select(0, keep)
        write_tokens(key_cache, value_cache, key, value, write_rows)
    return store_tokens


def _padded_block_tables(segments: list[Segment], block_size: int) -> torch.Tensor:
    """int64 ``[len(segments), widest]``: the blocks each segment attends over (past and new tokens), padded with 0."""
    seen = [-(-(s.past + s.length) // block_size) for s in segments]
    tables = torch.zeros(len(segments), max(seen), dtype=torch.long)
    for row, segment in enumerate(segments):
        tables[row, : seen[row]] = torch.tensor(segment.block_table[: seen[row]], dtype=torch.long)
    return tables


def _decode_rows(segments: list[Segment], block_size: int) -> DecodeRows:
    """One kernel row per token: a segment of several generated tokens gives one row each, the i-th attending
    over past + i + 1 keys, exactly as if it were decoded alone."""
    tables = _padded_block_tables(segments, block_size)
    repeat = torch.tensor([s.length for s in segments])
    return DecodeRows(
        block_tables=tables.repeat_interleave(repeat, dim=0),
        context_lens=torch.tensor([s.past + 1 + i for s in segments for i in range(s.length)], dtype=torch.long),
        query_rows=torch.tensor([s.start + i for s in segments for i in range(s.length)], dtype=torch.long),
    )


def _batch(segments: list[Segment], block_size: int, mask_dtype: torch.dtype, device: torch.device) -> AttentionBatch:
    b = len(segments)
    lengths = torch.tensor([s.length for s in segments])
    pasts = torch.tensor([s.past for s in segments])
    starts = torch.tensor([s.start for s in segments])
    q = int(lengths.max())
    tables = _padded_block_tables(segments, block_size)
    k = tables.shape[1] * block_size
    query_positions = torch.arange(q)
    clamped = torch.minimum(query_positions.unsqueeze(0), (lengths - 1).unsqueeze(1))  # [b, q]
    key_positions = torch.arange(k)
    # query i of a segment sees its session's positions up to past + i; padded queries copy their last real row
    allowed = key_positions.view(1, 1, k) <= (pasts.view(b, 1, 1) + clamped.unsqueeze(2))
    mask = torch.zeros(b, 1, q, k, dtype=mask_dtype).masked_fill_(~allowed.unsqueeze(1), float("-inf"))
    real = (query_positions.unsqueeze(0) < lengths.unsqueeze(1)).flatten()
    query_index = (starts.unsqueeze(1) + clamped).flatten()
    real_rows = real.nonzero().squeeze(1)
    return AttentionBatch(
        batch=b,
        queries=q,
        query_index=query_index.to(device),
        key_blocks=tables.flatten().to(device),
        mask=mask.to(device),
        real_rows=real_rows.to(device),
        output_index=query_index[real_rows].to(device),
    )


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, heads, T, head_dim]
    key: torch.Tensor,  # [1, kv_heads, T, head_dim]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    chatkv_step: PackedStep | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Attention output ``[1, T, heads, head_dim]`` for a packed step (stock SDPA when ``chatkv_step`` is None).

    The signature transformers' ``AttentionInterface`` calls; ``attend`` does the work.
    """
    if chatkv_step is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    attended = attend(module, query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), scaling, chatkv_step)
    return attended.unsqueeze(0), None


def attend(
    module: object,
    query: torch.Tensor,  # [T, heads, head_dim]
    key: torch.Tensor,  # [T, kv_heads, head_dim]
    value: torch.Tensor,
    scaling: float | None,
    step: PackedStep | None,
) -> torch.Tensor:
    """Attention output ``[T, heads, head_dim]``: the step's K/V go into the pool, then every row attends over its session.

    ``module`` carries ``layer_idx`` (and, without a step, what transformers' SDPA reads: ``is_causal``,
    ``num_key_value_groups``); without a step the input attends causally over itself.
    """
    if step is None:
        attended, _ = sdpa_attention_forward(
            module, query.transpose(0, 1)[None], key.transpose(0, 1)[None], value.transpose(0, 1)[None], None, scaling=scaling
        )
        return attended[0]
    key_cache, value_cache = step.layer_caches[module.layer_idx]  # see kv_blocks.layer_caches
    if step.store_kv is not None:
        step.store_kv(key_cache, value_cache, key, value)
    total, heads, head_dim = query.shape
    kv_heads = value_cache.shape[1]
    groups = heads // kv_heads
    output = query.new_empty(total, heads, head_dim)
    if step.decode_rows is not None:
        rows = step.decode_rows
        step.decode_kernel(
            query, key, value, key_cache, value_cache, rows.block_tables, rows.context_lens, rows.query_rows,
            output, scaling if scaling is not None else head_dim**-0.5,
        )
    if not step.batches:
        return output
    by_head = query.transpose(0, 1)  # [heads, T, head_dim]
    for batch in step.batches:  # decode rows without the kernel; prefill chunks
        b, q = batch.batch, batch.queries
        folded = (
            by_head.index_select(1, batch.query_index)
            .view(kv_heads, groups, b, q, head_dim)
            .permute(2, 0, 1, 3, 4)
            .reshape(b, kv_heads, groups * q, head_dim)
        )
        keys = keys_as_tokens(key_cache.index_select(0, batch.key_blocks).unflatten(0, (b, -1)))
        values = values_as_tokens(value_cache.index_select(0, batch.key_blocks).unflatten(0, (b, -1)))
        attended = F.scaled_dot_product_attention(folded, keys, values, attn_mask=batch.folded_mask(groups), scale=scaling)
        rows = attended.view(b, kv_heads, groups, q, head_dim).permute(0, 3, 1, 2, 4).reshape(b * q, heads, head_dim)
        output.index_copy_(0, batch.output_index, rows.index_select(0, batch.real_rows))
    return output


AttentionInterface.register(ATTENTION_NAME, packed_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def use_packed_attention(model: torch.nn.Module) -> None:
    """Route the model's attention through ``packed_attention`` (plain calls still get stock SDPA)."""
    model.config._attn_implementation = ATTENTION_NAME
