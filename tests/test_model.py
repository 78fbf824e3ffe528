"""Resolving --model, loading with a dtype, and the fingerprint a KV cache belongs to."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from chatkv.model.loader import ModelError, choose_dtype, config_hash, load_model
from chatkv.model.source import find_default_gguf, resolve


def test_a_hub_id_offline_fails_fast_with_a_message_that_says_what_to_do(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # nothing cached
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(ModelError) as error:
        load_model("some-org/some-model", tmp_path, dtype="float32", device="cpu")
    assert time.monotonic() - started < 30
    message = str(error.value)
    assert "some-org/some-model" in message and "--model with the local folder" in message


@pytest.mark.parametrize(("spec", "complaint"), [
    ("/no/such/file.gguf", "No such GGUF file"),
    ("./not-a-model-anywhere", "No model at"),
])
def test_a_model_that_is_not_there_is_explained(tmp_path: Path, spec: str, complaint: str):
    with pytest.raises(ModelError, match=complaint):
        load_model(spec, tmp_path, dtype="float32", device="cpu")


def test_a_folder_without_a_config_is_not_taken_for_a_model(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path / "empty"), tmp_path, dtype="float32", device="cpu")


def test_unknown_dtype_and_missing_cuda_are_refused_with_a_message(tmp_path: Path):
    with pytest.raises(ModelError, match="Unknown dtype"):
        choose_dtype("float8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA GPU"):
            load_model("smollm2", tmp_path, device="cuda")


def test_fingerprint_names_the_model_and_changes_with_dtype_not_with_the_folder(real_bundle, smollm2_dir, models_dir):
    bf16 = load_model(str(smollm2_dir), models_dir, dtype="bfloat16", device="cpu")
    assert real_bundle.fingerprint.model_id == bf16.fingerprint.model_id == "SmolLM2-135M-Instruct"
    assert real_bundle.fingerprint.config_hash == bf16.fingerprint.config_hash == config_hash(bf16.model.config)
    assert (real_bundle.fingerprint.dtype, bf16.fingerprint.dtype) == ("float32", "bfloat16")
    assert bf16.model.dtype == torch.bfloat16


def test_the_chat_template_and_end_of_turn_token_come_from_the_tokenizer(real_bundle):
    tokenizer = real_bundle.tokenizer
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.convert_ids_to_tokens(tokenizer.eos_token_id) == "<|im_end|>"


@pytest.mark.real_model
def test_a_gguf_file_is_converted_once_and_then_loaded_from_the_cache(smollm2_dir, models_dir, tmp_path: Path):
    gguf = find_default_gguf(models_dir)
    if gguf is None:
        pytest.skip("the default model was converted elsewhere; its GGUF is not in this cache")
    first = resolve(str(gguf), tmp_path)
    converted = Path(first.path)
    assert (converted / "config.json").is_file() and first.model_id == "SmolLM2-135M-Instruct.Q4_1"
    stamp = (converted / "config.json").stat().st_mtime_ns
    again = resolve(str(gguf), tmp_path)
    assert again.path == first.path and (converted / "config.json").stat().st_mtime_ns == stamp
