"""Packed attention: one forward pass serves many sessions, each attending over its own KV.

Every engine step packs the new tokens of all scheduled sessions into one ``[1, T]`` input. The
linear layers (most of the cost) run once over all of them; only attention is per session. This
function is registered with transformers' ``AttentionInterface`` and reached through the stock
Llama modules: for each segment of the packed input it appends the segment's keys and values
(RoPE already applied) to that session's KV tensor and attends over the session's past plus the
new part.

Calls that do not come from the engine (``model.generate``, the reference, the bench's baselines)
carry no ``PackedStep`` and go to transformers' own SDPA attention with its own masks, so the
same model object stays a stock transformers model for them, even while the engine runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION_NAME = "chatkv_packed"


@dataclass
class Segment:
    """A run of new tokens of one session inside the packed input."""

    kv: torch.Tensor  # the session's storage: [layers, 2, kv_heads, capacity, head_dim]
    start: int  # first position of the segment in the packed input
    length: int  # how many new tokens
    past: int  # tokens already in kv before this step
    mask: torch.Tensor | None = field(default=None, repr=False)  # built by the first layer, reused by the rest


@dataclass
class PackedStep:
    segments: list[Segment]


def _causal_mask_with_past(length: int, past: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive mask letting new token i see every past token and new tokens up to i.

    A float mask (0 / -inf) gives the same outputs as a boolean one but takes a faster SDPA path on CPU.
    """
    allowed = torch.ones(length, past + length, dtype=torch.bool, device=device).tril(diagonal=past)
    return torch.zeros(length, past + length, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))


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
    if chatkv_step is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    layer = module.layer_idx
    total = query.shape[2]
    output = query.new_empty(1, total, query.shape[1], query.shape[3])
    for segment in chatkv_step.segments:
        start, length, past = segment.start, segment.length, segment.past
        keys = segment.kv[layer, 0]
        values = segment.kv[layer, 1]
        keys[:, past : past + length] = key[0, :, start : start + length]
        values[:, past : past + length] = value[0, :, start : start + length]
        seen = past + length
        past_keys = keys[:, :seen].unsqueeze(0)
        past_values = values[:, :seen].unsqueeze(0)
        if length == 1:
            # one query per head: fold the query heads that share a KV head into that head's rows,
            # which needs no mask and no GQA expansion (several times faster in bf16 on CPU)
            groups = query.shape[1] // keys.shape[0]
            folded = query[:, :, start].reshape(1, keys.shape[0], groups, query.shape[3])
            attended = F.scaled_dot_product_attention(folded, past_keys, past_values, scale=scaling)
            output[0, start] = attended.reshape(query.shape[1], query.shape[3])
            continue
        if past and segment.mask is None:
            segment.mask = _causal_mask_with_past(length, past, query.dtype, query.device)
        mask = segment.mask
        attended = F.scaled_dot_product_attention(
            query[:, :, start : start + length],
            past_keys,
            past_values,
            attn_mask=mask,
            is_causal=mask is None,
            scale=scaling,
            enable_gqa=True,
        )
        output[0, start : start + length] = attended[0].transpose(0, 1)
    return output, None


AttentionInterface.register(ATTENTION_NAME, packed_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def use_packed_attention(model: torch.nn.Module) -> None:
    """Route the model's attention through ``packed_attention`` (plain calls still get stock SDPA)."""
    model.config._attn_implementation = ATTENTION_NAME
