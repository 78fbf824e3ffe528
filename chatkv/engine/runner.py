"""Run one packed forward pass of the model over the new tokens of every scheduled session."""

from __future__ import annotations

import torch

from chatkv.engine.attention import PackedStep, Segment, use_packed_attention
from chatkv.engine.kv_store import KvLayout
from chatkv.model.loader import ModelBundle


def kv_layout_of(config) -> KvLayout:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return KvLayout(config.num_hidden_layers, config.num_key_value_heads, head_dim)


class ModelRunner:
    def __init__(self, bundle: ModelBundle) -> None:
        use_packed_attention(bundle.model)
        self.model = bundle.engine_model  # the lean Llama forward where there is one
        self.device = bundle.device
        self.layout = kv_layout_of(bundle.model.config)
        self.tokens_fed = 0  # every token that went through the model: tests check reuse against it

    def forward(
        self, input_ids: list[int], positions: list[int], segments: list[Segment], logits_rows: list[int]
    ) -> torch.Tensor:
        """Logits (float32, on CPU) at the packed positions ``logits_rows``, one row each."""
        ids = torch.tensor([input_ids], dtype=torch.long, device=self.device)
        position_ids = torch.tensor([positions], dtype=torch.long, device=self.device)
        keep = torch.tensor(logits_rows or [len(input_ids) - 1], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            output = self.model(
                input_ids=ids,
                position_ids=position_ids,
                use_cache=False,
                logits_to_keep=keep,
                chatkv_step=PackedStep(segments),
            )
        self.tokens_fed += len(input_ids)
        return output.logits[0].float().cpu()
