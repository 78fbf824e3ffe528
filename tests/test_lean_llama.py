"""The lean Llama forward and quantized weights: exact against their own full-recompute reference, cached once, fingerprinted."""

from __future__ import annotations

import pytest
import torch

from chatkv.config import Settings
from chatkv.conversation import Message
from chatkv.engine import Engine, Sampling
from chatkv.engine.reference import greedy_full_recompute
from chatkv.engine.snapshot import SnapshotStore
from chatkv.model.loader import Fingerprint, ModelError, load_model
from chatkv.model.quant_cache import load_or_quantize
from chatkv.model.source import ModelSource
from tests.conftest import make_tiny_bundle

QUESTIONS = ["What is the capital of France?", "Name three colours of the rainbow.", "Write a haiku about the sea."]


def replies_match_own_reference(bundle, sessions: int, turns: int, max_new_tokens: int) -> None:
    """Sessions decode together, turn after turn, reusing their KV; each reply equals full recompute with the same weights."""
    engine = Engine(bundle, Settings()).start()
    conversations = {f"s{i}": [] for i in range(sessions)}
    try:
        for turn in range(turns):
            handles = {}
            for index, (session_id, messages) in enumerate(conversations.items()):
                messages.append(Message("user", QUESTIONS[index % len(QUESTIONS)] if turn == 0 else "Tell me more."))
                handles[session_id] = engine.submit(session_id, list(messages), Sampling(max_new_tokens=max_new_tokens))
            for session_id, handle in handles.items():
                result = handle.wait(300)
                assert result.error is None, result.error
                expected = greedy_full_recompute(bundle.reference_model, result.prompt_ids, max_new_tokens, engine.eos_ids)
                assert result.reply_ids == expected, f"turn {turn + 1} of {session_id} differs from its reference"
                if turn:
                    assert result.reused_from == "memory"
                conversations[session_id].append(Message("assistant", result.reply, token_ids=result.reply_ids))
    finally:
        engine.close()


@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
def test_tiny_model_each_quantization_is_exact_against_its_own_reference(tiny_bundle, quant):
    bundle = make_tiny_bundle(tiny_bundle.tokenizer, quant)
    assert bundle.lean is not None and bundle.quant == quant
    replies_match_own_reference(bundle, sessions=3, turns=2, max_new_tokens=10)


def test_lean_forward_gives_the_transformers_logits_bit_for_bit_in_fp32(tiny_bundle):
    ids = torch.tensor([list(range(200, 260))])
    with torch.inference_mode():
        expected = tiny_bundle.model(input_ids=ids, use_cache=False).logits
    assert torch.equal(tiny_bundle.lean(input_ids=ids, use_cache=False).logits, expected)


def test_unquantized_lean_model_shares_its_fused_weights_with_transformers(tiny_bundle):
    layer = tiny_bundle.model.model.layers[0]
    fused = tiny_bundle.lean.layers[0].qkv.weight
    assert layer.self_attn.q_proj.weight.data_ptr() == fused.data_ptr()


@pytest.mark.real_model
def test_real_model_lean_fp32_logits_equal_transformers(real_bundle):
    assert real_bundle.quant == "none" and real_bundle.lean is not None
    ids = torch.tensor([real_bundle.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 8)])
    with torch.inference_mode():
        expected = real_bundle.model(input_ids=ids, use_cache=False).logits
    assert torch.equal(real_bundle.lean(input_ids=ids, use_cache=False).logits, expected)


@pytest.mark.real_model
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_real_model_quantized_is_exact_against_its_own_reference(models_dir, smollm2_dir, quant):
    # fp32 activations: the exact mode, as for unquantized weights (bf16 rounds differently per kernel)
    bundle = load_model("smollm2", models_dir, dtype="float32", device="cpu", quant=quant, progress=lambda _: None)
    assert bundle.fingerprint.dtype == f"float32+{quant}"
    replies_match_own_reference(bundle, sessions=2, turns=2, max_new_tokens=16)


@pytest.mark.real_model
def test_auto_quantization_is_int4_in_bf16_and_none_in_fp32(models_dir, smollm2_dir, real_bundle):
    assert real_bundle.quant == "none" and real_bundle.fingerprint.dtype == "float32"
    bundle = load_model("smollm2", models_dir, dtype="bfloat16", device="cpu", quant="auto", progress=lambda _: None)
    assert bundle.quant == "int4"


def test_unknown_quantization_is_a_clear_error(models_dir, smollm2_dir):
    with pytest.raises(ModelError, match="choose auto, none, int8 or int4"):
        load_model("smollm2", models_dir, dtype="float32", device="cpu", quant="int3", progress=lambda _: None)


def test_quantized_weights_are_computed_once_then_read_from_the_cache(tiny_bundle, tmp_path):
    source = ModelSource(model_id="tiny-random-llama", path=str(tmp_path / "no-checkpoint"))
    said: list[str] = []
    first = load_or_quantize(tiny_bundle.model, "int4", source, "abc", tmp_path / "quantized", said.append)
    assert len(said) == 1 and "Quantizing" in said[0]
    second = load_or_quantize(tiny_bundle.model, "int4", source, "abc", tmp_path / "quantized", said.append)
    assert len(said) == 1, "the second load quantized again instead of reading the cache"
    assert first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)
    cached = next((tmp_path / "quantized").glob("*.safetensors"))
    cached.write_bytes(b"not safetensors")
    again = load_or_quantize(tiny_bundle.model, "int4", source, "abc", tmp_path / "quantized", said.append)
    assert len(said) == 2 and all(torch.equal(first[name], again[name]) for name in first)


def test_kv_snapshot_is_not_restored_under_another_quantization(tmp_path):
    kv = torch.zeros(2, 2, 2, 4, 16)
    plain = Fingerprint("tiny-random-llama", "abc", "bfloat16")
    SnapshotStore(tmp_path, plain, 1 << 30).save("s1", kv, [1, 2, 3, 4])
    quantized = Fingerprint("tiny-random-llama", "abc", "bfloat16+int4")
    assert SnapshotStore(tmp_path, quantized, 1 << 30).load("s1", (2, 2, 16), torch.float32) is None
    assert SnapshotStore(tmp_path, plain, 1 << 30).load("s1", (2, 2, 16), torch.float32) is not None
