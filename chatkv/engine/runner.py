"""Run one packed forward pass of the model over the new tokens of every scheduled session."""

from __future__ import annotations

from typing import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from chatkv.engine.attention import PackedStep, Segment, use_packed_attention
from chatkv.engine.kv_blocks import KvLayout
from chatkv.engine.kv_store import BLOCK_SIZE
from chatkv.engine.paged_kernel import decode_kernel_for, kv_write_kernel
from chatkv.model.loader import ModelBundle

# Chosen explicitly: left to itself, torch on CUDA may pick cuDNN attention, which builds a new plan for
# every new KV length (tens of ms each). Memory-efficient attention takes our additive mask on CUDA;
# the CPU takes its flash kernel (which also takes a mask); math is the fallback for anything else.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def kv_layout_of(config) -> KvLayout:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return KvLayout(config.num_hidden_layers, config.num_key_value_heads, head_dim)


def exact_float32_matmuls(device: torch.device, dtype: torch.dtype) -> None:
    """float32 means float32: turn TF32 off on CUDA, whatever the user's torch defaults are."""
    if dtype == torch.float32 and torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


class ModelRunner:
    def __init__(
        self, bundle: ModelBundle, block_size: int = BLOCK_SIZE, progress: Callable[[str], None] | None = None
    ) -> None:
        use_packed_attention(bundle.model)
        self.model = bundle.engine_model  # the lean Llama forward where there is one
        self.device = bundle.device
        self.dtype = bundle.dtype
        exact_float32_matmuls(self.device, self.dtype)
        self.layout = kv_layout_of(bundle.model.config)
        self.block_size = block_size
        # the CPU decode kernel, or None (CUDA, no compiler, a shape it does not serve): attention then
        # gathers and calls SDPA; why not is in decode_kernel_missing
        self.decode_kernel, self.decode_kernel_missing = None, "not used on this device"
        self.kv_write = None  # with the decode kernel: its companion that stores each step's K/V
        if torch.device(self.device).type == "cpu":
            config = bundle.model.config
            self.decode_kernel, self.decode_kernel_missing = decode_kernel_for(
                config.num_attention_heads, self.layout.kv_heads, self.layout.head_dim, block_size, progress
            )
            self.kv_write = kv_write_kernel() if self.decode_kernel is not None else None
        self.tokens_fed = 0  # every token that went through the model: tests check reuse against it

    def forward(
        self,
        input_ids: list[int],
        positions: list[int],
        step: list[Segment] | PackedStep,
        logits_rows: list[int],
        kv: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[len(logits_rows), vocab]`` (float32, on the model's device) at the packed positions ``logits_rows``.

        ``step`` is a built ``PackedStep``, or the step's segments plus ``kv``, the pool they index.
        """
        if not isinstance(step, PackedStep):
            step = PackedStep.build(kv, step, self.block_size, self.dtype, self.decode_kernel, self.kv_write)
        ids = torch.tensor([input_ids], dtype=torch.long).to(self.device)
        position_ids = torch.tensor([positions], dtype=torch.long).to(self.device)
        keep = torch.tensor(logits_rows or [len(input_ids) - 1], dtype=torch.long).to(self.device)
        with torch.inference_mode(), sdpa_kernel(SDPA_BACKENDS):
            output = self.model(
                input_ids=ids,
                position_ids=position_ids,
                use_cache=False,
                logits_to_keep=keep,
                chatkv_step=step,
            )
        self.tokens_fed += len(input_ids)
        return output.logits[0].float()
