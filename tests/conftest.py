"""Shared fixtures: the real SmolLM2 model (fetched and converted once into the user's cache) and a tiny random Llama."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from chatkv.model.loader import Fingerprint, ModelBundle, config_hash, load_model
from chatkv.model.source import DEFAULT_MODEL, DEFAULT_MODEL_ID, resolve
from chatkv.paths import Paths

torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The user's model cache, shared by every test run (the conversion takes ~20 s once)."""
    folder = Paths.resolve(None).models
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def smollm2_dir(models_dir: Path) -> Path:
    """The converted SmolLM2 checkpoint folder (pass it as --model to subprocesses to skip the lookup)."""
    return Path(resolve(DEFAULT_MODEL, models_dir).path)


@pytest.fixture(scope="session")
def real_bundle(smollm2_dir: Path, models_dir: Path) -> ModelBundle:
    """SmolLM2-135M-Instruct in fp32: the model exactness tests use."""
    return load_model(DEFAULT_MODEL, models_dir, dtype="float32", device="cpu")


def make_tiny_bundle(tokenizer, quant: str = "none", initializer_range: float = 0.02) -> ModelBundle:
    """The engine runs its lean forward (weights fused; quantized unless ``quant`` is none), as for the real model.

    At the default ``initializer_range`` the model answers every prompt with one token over and over; at 0.1
    its replies mix runs of a repeated token with changing ones (speculative decoding's guesses then both
    hit and miss)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from chatkv.model.lean_llama import LeanLlama

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        initializer_range=initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32).eval().requires_grad_(False)
    weights = "float32" if quant == "none" else f"float32+{quant}"
    fingerprint = Fingerprint("tiny-random-llama", config_hash(config), weights)
    lean = LeanLlama(model, quant, torch.float32)
    return ModelBundle(model, tokenizer, fingerprint, torch.float32, torch.device("cpu"), 0.0, lean=lean, quant=quant)


@pytest.fixture(scope="session")
def tiny_bundle(real_bundle: ModelBundle) -> ModelBundle:
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template, fp32."""
    return make_tiny_bundle(real_bundle.tokenizer)


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private CHATKV_HOME for one test."""
    home = tmp_path / "chatkv-home"
    monkeypatch.setenv("CHATKV_HOME", str(home))
    return home


__all__ = ["DEFAULT_MODEL_ID", "make_tiny_bundle"]
