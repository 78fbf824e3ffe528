"""A lean forward pass for Llama-family models: fused projections, optional int8/int4 weights, few ops per layer.

The stock transformers Llama spends most of a single-token decode step in Python and per-op dispatch
(SmolLM2-135M: 30 layers, ~20 modules each). ``LeanLlama`` holds the same weights with q/k/v fused
into one matrix and gate/up into another, optionally quantized (weight-only: activations stay in the
model dtype), and runs a layer in about a dozen torch calls. Attention still goes through
``chatkv.engine.attention.packed_attention`` with the step object passed through untouched, so the
engine's KV storage stays the engine's business.

Quantization modes (``QUANT_MODES``):

- ``none``: the model's own weights, fused.
- ``int8``: symmetric per-output-channel int8 (chatkv's ``int8_linear`` kernel where it is built, else
  ``torch._weight_int8pack_mm``).
- ``int4``: asymmetric group-32 int4 (``torch._weight_int4pack_mm_for_cpu``), the layout of GGUF Q4_1,
  so SmolLM2's Q4_1 weights come back almost exactly; the output head (tied embeddings) is int8.

Those kernels win only for a few rows (decode); above ``QUANT_MAX_ROWS`` rows (prefill, many tabs) a
quantized linear multiplies by its dequantized weights in the model dtype, so either way the model
computes with the same weights.

Called without a step (``model(input_ids=..., use_cache=False, logits_to_keep=1)``) it attends causally
over its whole input: that is the full-recompute reference for a quantized mode, with the same weights.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

QUANT_MODES = ("none", "int8", "int4")
INT4_GROUP = 32
INT4_INNER_K_TILES = 2
# torch's weight-only kernels beat a dense bf16 matmul for a few rows (decode) but lose ~3x from ~16 rows on
# (prefill, many tabs decoding together), so above this many rows a quantized linear multiplies by its
# dequantized weights instead: the same weights, the dense kernel's speed
QUANT_MAX_ROWS = 8


class QuantError(Exception):
    """A quantization mode that this model or machine cannot run; the message says what to do instead."""


def lean_supported(config: Any) -> bool:
    """True for the architectures ``LeanLlama`` reproduces exactly (plain Llama: no biases, no rope scaling tricks)."""
    if getattr(config, "model_type", None) != "llama":
        return False
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return False
    if getattr(config, "hidden_act", "silu") != "silu":
        return False
    return True


# ---- weights -------------------------------------------------------------------------------------


def quantize_int8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """``weight`` [out, in] float -> int8 [out, in] and float32 scales [out] (symmetric, per output channel)."""
    weight = weight.float()
    scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    quantized = torch.round(weight / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return {"q": quantized, "scales": scales}


def quantize_int4(weight: torch.Tensor, group: int = INT4_GROUP) -> dict[str, torch.Tensor]:
    """``weight`` [out, in] float -> uint8 levels 0..15 [out, in], float32 scales and mins [out, in/group].

    Asymmetric per group of ``group`` input weights: w ≈ q·scale + min, which is GGUF Q4_1's layout.
    """
    out_features, in_features = weight.shape
    if in_features % group:
        raise QuantError(f"int4 needs input sizes that are multiples of {group}; this model has {in_features}")
    groups = weight.float().reshape(out_features, in_features // group, group)
    low = groups.amin(dim=-1)
    high = groups.amax(dim=-1)
    scales = ((high - low) / 15.0).clamp(min=1e-8)
    levels = torch.round((groups - low[..., None]) / scales[..., None]).clamp_(0, 15)
    return {"q": levels.to(torch.uint8).reshape(out_features, in_features), "scales": scales, "mins": low}


class Linear:
    """A weight-only (optionally quantized) linear map without bias: ``x`` [rows, in] -> [rows, out]."""

    def __init__(self, kind: str, dtype: torch.dtype, **tensors: torch.Tensor) -> None:
        self.kind = kind
        self.out_features = tensors["q"].shape[0] if kind != "none" else tensors["weight"].shape[0]
        if kind == "none":
            self.weight = tensors["weight"].to(dtype).contiguous()
            return
        if kind == "int8":
            self.weight = tensors["q"].contiguous()
            self.scales = tensors["scales"].to(dtype).contiguous()  # torch's kernel takes them in the model dtype
            self.scales_fp32 = tensors["scales"].float().contiguous()  # chatkv's kernel keeps them exact
            self.dense = (tensors["q"].float() * tensors["scales"].float()[:, None]).to(dtype)
        elif kind == "int4":
            levels = tensors["q"].to(torch.int32).contiguous()
            self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels, INT4_INNER_K_TILES)
            scales, mins = tensors["scales"].float(), tensors["mins"].float()
            zeros = mins + scales * 8.0  # the kernel computes (q - 8)·scale + zero
            self.scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(dtype)
            out_features, in_features = levels.shape
            grouped = levels.float().reshape(out_features, -1, INT4_GROUP)
            self.dense = (grouped * scales[..., None] + mins[..., None]).reshape(out_features, in_features).to(dtype)
        else:
            raise QuantError(f"unknown quantization {kind!r}: choose one of {', '.join(QUANT_MODES)}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "none" or x.shape[0] > QUANT_MAX_ROWS:
            return F.linear(x, self.weight if self.kind == "none" else self.dense)
        if self.kind == "int8":
            kernel = _int8_kernel(self.weight.shape[1]) if x.device.type == "cpu" else None
            if kernel is not None:
                return kernel(x.contiguous(), self.weight, self.scales_fp32)
            return torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scales)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, INT4_GROUP, self.scales_and_zeros)

    @property
    def nbytes(self) -> int:
        """Bytes of the weights the quantized kernel reads per token (the dense copy for many rows not counted)."""
        held = [self.weight] + [getattr(self, name) for name in ("scales", "scales_and_zeros") if hasattr(self, name)]
        return sum(t.numel() * t.element_size() for t in held)


@functools.cache
def _int8_kernel(in_features: int):
    """``torch.ops.chatkv.int8_linear`` where chatkv's CPU kernels are built and serve this width, else None.

    About twice as fast as ``_weight_int8pack_mm`` for SmolLM2's output head (``chatkv/kernels/int8_linear.cpp``).
    The engine builds the kernels when it starts, with a note the first time; this only loads them.
    """
    from chatkv import kernels

    if kernels.load() is not None or not torch.ops.chatkv.int8_linear_supported(in_features):
        return None
    return torch.ops.chatkv.int8_linear


def quantized_tensors(weight: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
    """What ``Linear(kind, ...)`` is built from; the part worth caching on disk."""
    if kind == "none":
        return {"weight": weight}
    if kind == "int8":
        return quantize_int8(weight)
    if kind == "int4":
        return quantize_int4(weight)
    raise QuantError(f"unknown quantization {kind!r}: choose one of {', '.join(QUANT_MODES)}")


def head_kind(kind: str) -> str:
    """The output head stays int8 under int4: it decides every token, and int4 there costs agreement for little speed."""
    return "int8" if kind == "int4" else kind


def fused_weights(model: Any, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The float weights of a transformers Llama, q/k/v and gate/up concatenated, keyed by lean names.

    ``state``: the checkpoint's own tensors by transformers name (e.g. fp32 from disk, where the loaded model
    holds bf16), so quantization starts from the most precise weights there are; missing names come from ``model``.
    """
    live = dict(model.named_parameters())
    live.setdefault("lm_head.weight", model.lm_head.weight)

    def get(name: str) -> torch.Tensor:
        if state is not None and name in state:
            return state[name]
        if name == "lm_head.weight" and state is not None and "model.embed_tokens.weight" in state:
            return state["model.embed_tokens.weight"] if model.config.tie_word_embeddings else live[name]
        return live[name].detach()

    weights: dict[str, torch.Tensor] = {}
    for index in range(model.config.num_hidden_layers):
        prefix = f"model.layers.{index}"
        weights[f"layers.{index}.qkv"] = torch.cat(
            [get(f"{prefix}.self_attn.{part}_proj.weight") for part in ("q", "k", "v")], dim=0
        )
        weights[f"layers.{index}.o"] = get(f"{prefix}.self_attn.o_proj.weight")
        weights[f"layers.{index}.gate_up"] = torch.cat(
            [get(f"{prefix}.mlp.gate_proj.weight"), get(f"{prefix}.mlp.up_proj.weight")], dim=0
        )
        weights[f"layers.{index}.down"] = get(f"{prefix}.mlp.down_proj.weight")
    weights["lm_head"] = get("lm_head.weight")
    return weights


def quantize_model(model: Any, kind: str, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Every linear of the model in mode ``kind`` as flat ``name.part`` tensors (safetensors-ready)."""
    flat: dict[str, torch.Tensor] = {}
    for name, weight in fused_weights(model, state).items():
        mode = head_kind(kind) if name == "lm_head" else kind
        for part, tensor in quantized_tensors(weight.detach(), mode).items():
            flat[f"{name}.{part}"] = tensor.contiguous()
    return flat


# ---- the forward pass ----------------------------------------------------------------------------


@dataclass
class LeanOutput:
    logits: torch.Tensor  # [1, rows, vocab]


class _AttentionSite:
    """What ``packed_attention`` reads from the module it is handed: the layer index; for plain SDPA, the causal
    flag and how many query heads share a KV head."""

    is_causal = True
    training = False

    def __init__(self, layer_idx: int, num_key_value_groups: int) -> None:
        self.layer_idx = layer_idx
        self.num_key_value_groups = num_key_value_groups


class _Layer:
    def __init__(self, index: int, hf_layer: Any, linears: dict[str, Linear], dtype: torch.dtype) -> None:
        self.site = _AttentionSite(index, hf_layer.self_attn.num_key_value_groups)
        self.input_norm = hf_layer.input_layernorm.weight.detach().to(dtype)
        self.post_norm = hf_layer.post_attention_layernorm.weight.detach().to(dtype)
        self.qkv = linears["qkv"]
        self.o = linears["o"]
        self.gate_up = linears["gate_up"]
        self.down = linears["down"]


class LeanLlama:
    """A Llama forward with the call shape of a transformers causal LM, as far as the engine and reference use it.

    ``__call__(input_ids [1, T], position_ids [1, T] | None, logits_to_keep int | index tensor,
    chatkv_step=step | None)`` returns ``LeanOutput(logits [1, rows, vocab])`` in the model dtype.
    """

    def __init__(self, model: Any, quant: str, dtype: torch.dtype, tensors: dict[str, torch.Tensor] | None = None) -> None:
        if quant not in QUANT_MODES:
            raise QuantError(f"unknown quantization {quant!r}: choose one of {', '.join(QUANT_MODES)}")
        if quant != "none" and dtype != torch.bfloat16 and dtype != torch.float32:
            raise QuantError(f"{quant} weights need bfloat16 or float32 activations, not {dtype}")
        config = model.config
        self.config = config
        self.quant = quant
        self.dtype = dtype
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.q_size = self.heads * self.head_dim
        self.kv_size = self.kv_heads * self.head_dim
        self.intermediate = config.intermediate_size
        self.eps = config.rms_norm_eps
        self.scaling = self.head_dim**-0.5
        self.embed = model.model.embed_tokens.weight.detach().to(dtype)
        self.final_norm = model.model.norm.weight.detach().to(dtype)
        if tensors is None:
            tensors = quantize_model(model, quant) if quant != "none" else {
                f"{name}.weight": weight.detach() for name, weight in fused_weights(model).items()
            }
        linears = {name: self._linear(tensors, name, head_kind(quant) if name == "lm_head" else quant)
                   for name in fused_weights_names(config.num_hidden_layers)}
        self.layers = [
            _Layer(index, hf_layer, {part: linears[f"layers.{index}.{part}"] for part in ("qkv", "o", "gate_up", "down")}, dtype)
            for index, hf_layer in enumerate(model.model.layers)
        ]
        self.lm_head = linears["lm_head"]
        if quant == "none":
            self._share_storage(model)
        self.cos, sin = self._rope_tables(model, config)
        half = self.head_dim // 2
        self.signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        self.device = self.embed.device

    def _share_storage(self, model: Any) -> None:
        """Point the transformers projections at slices of the fused matrices, so unquantized weights are held once."""
        for layer, hf_layer in zip(self.layers, model.model.layers):
            attention, mlp = hf_layer.self_attn, hf_layer.mlp
            if layer.qkv.weight.dtype != attention.q_proj.weight.dtype:
                return
            q, k, v = layer.qkv.weight.split([self.q_size, self.kv_size, self.kv_size])
            gate, up = layer.gate_up.weight.split([self.intermediate, self.intermediate])
            for module, view in ((attention.q_proj, q), (attention.k_proj, k), (attention.v_proj, v),
                                 (mlp.gate_proj, gate), (mlp.up_proj, up)):
                module.weight = torch.nn.Parameter(view, requires_grad=False)

    def _linear(self, tensors: dict[str, torch.Tensor], name: str, kind: str) -> Linear:
        parts = {key.removeprefix(f"{name}."): value for key, value in tensors.items() if key.startswith(f"{name}.")}
        if not parts:
            raise QuantError(f"the quantized weights have no entry for {name}")
        return Linear(kind, self.dtype, **parts)

    def _rope_tables(self, model: Any, config: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for every position [max_positions, head_dim], computed by the model's own rotary module."""
        positions = int(getattr(config, "max_position_embeddings", 2048) or 2048)
        probe = torch.empty(1, dtype=self.dtype, device=self.embed.device)
        ids = torch.arange(positions, device=self.embed.device)[None]
        with torch.inference_mode():
            cos, sin = model.model.rotary_emb(probe, ids)
        return cos[0].contiguous(), sin[0].contiguous()

    @property
    def weight_bytes(self) -> int:
        """Bytes of the linear weights as held (quantized where quantized), embeddings excluded."""
        return sum(linear.nbytes for layer in self.layers for linear in (layer.qkv, layer.o, layer.gate_up, layer.down)) + self.lm_head.nbytes

    def parameters(self):
        """For callers that look up the device from the first parameter (the reference)."""
        yield self.embed

    def _norm(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.quant != "none":
            # one fused op; quantized modes are exact against their own reference, which runs this same code
            return F.rms_norm(hidden, weight.shape, weight, self.eps)
        # unquantized: the transformers LlamaRMSNorm computation, op for op, so fp32 stays bit-identical to it
        widened = hidden.float()
        variance = widened.pow(2).mean(-1, keepdim=True)
        return weight * (widened * torch.rsqrt(variance + self.eps)).to(hidden.dtype)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """RoPE on ``x`` [T, heads, head_dim]: x·cos + rotate_half(x)·sin, with rotate_half's minus sign folded into
        ``signed_sin`` (exact: only a sign moves), so queries and keys rotate together in five ops."""
        half = self.head_dim // 2
        swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
        return x * cos + swapped * signed_sin

    @torch.inference_mode()
    def __call__(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        chatkv_step: Any = None,
        **_: Any,
    ) -> LeanOutput:
        from chatkv.engine.attention import attend

        total = input_ids.shape[1]
        positions = position_ids[0] if position_ids is not None else torch.arange(total, device=input_ids.device)
        cos = self.cos[positions][:, None, :]  # [T, 1, head_dim], broadcast over heads
        signed_sin = self.signed_sin[positions][:, None, :]
        hidden = self.embed[input_ids[0]]  # [T, hidden]
        rotated_heads, k_end = self.heads + self.kv_heads, self.q_size + self.kv_size
        for layer in self.layers:
            qkv = layer.qkv(self._norm(hidden, layer.input_norm))
            query_key = self._rotate(qkv[:, :k_end].view(total, rotated_heads, self.head_dim), cos, signed_sin)
            attended = attend(
                layer.site,
                query_key[:, : self.heads],
                query_key[:, self.heads :],
                qkv[:, k_end:].view(total, self.kv_heads, self.head_dim),
                self.scaling,
                chatkv_step,
            )
            hidden = hidden + layer.o(attended.view(total, self.q_size))
            gate_up = layer.gate_up(self._norm(hidden, layer.post_norm))
            hidden = hidden + layer.down(F.silu(gate_up[:, : self.intermediate]) * gate_up[:, self.intermediate :])
        if isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[logits_to_keep]
        elif logits_to_keep:
            hidden = hidden[-logits_to_keep:]
        logits = self.lm_head(self._norm(hidden, self.final_norm))
        return LeanOutput(logits[None])


def fused_weights_names(layers: int) -> list[str]:
    names = [f"layers.{index}.{part}" for index in range(layers) for part in ("qkv", "o", "gate_up", "down")]
    return names + ["lm_head"]
