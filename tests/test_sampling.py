"""Sampling defaults and the repetition penalty: where the values come from, and what the penalty does to a draw.

Greedy decoding (temperature 0) must stay plain argmax: the exactness tests and the bench rely on it.
"""

from __future__ import annotations

import os
import stat
from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationConfig

from chatkv.config import SAMPLING_FALLBACK, GenerationOptions, load_settings
from chatkv.engine.api import REPETITION_WINDOW, EngineError, Sampling
from chatkv.engine.sampler import make_generator, next_token, recent_ids
from chatkv.model.loader import ModelBundle
from chatkv.paths import make_private_tree


def bundle_with(generation_config: GenerationConfig | None) -> ModelBundle:
    return ModelBundle(SimpleNamespace(generation_config=generation_config), None, None, torch.float32,
                       torch.device("cpu"), 0.0)


def test_the_models_own_generation_config_gives_the_defaults_it_sets():
    config = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8, repetition_penalty=1.05)
    assert bundle_with(config).sampling_defaults == {"temperature": 0.7, "top_p": 0.8, "repetition_penalty": 1.05}
    # transformers' own defaults are not the model's choice
    assert bundle_with(GenerationConfig(bos_token_id=1)).sampling_defaults == {}


def test_unset_values_come_from_the_model_then_the_fallback_and_config_toml_wins(tmp_path):
    generation = GenerationOptions()
    generation.fill_sampling_defaults({"temperature": 0.7})
    assert (generation.temperature, generation.top_p, generation.repetition_penalty) == (0.7, 0.9, 1.1)

    path = tmp_path / "config.toml"
    path.write_text("[generation]\ntemperature = 0\nrepetition_penalty = 1.3\n")
    settings, messages = load_settings(path)
    assert messages == []
    settings.generation.fill_sampling_defaults({"temperature": 0.7, "repetition_penalty": 1.05})
    assert (settings.generation.temperature, settings.generation.repetition_penalty) == (0.0, 1.3)
    assert GenerationOptions().sampling_value("top_p") == SAMPLING_FALLBACK["top_p"]


def test_a_bad_repetition_penalty_in_config_toml_is_reported_and_left_unset(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("[generation]\nrepetition_penalty = 0\n")
    settings, messages = load_settings(path)
    assert settings.generation.repetition_penalty is None
    assert any("repetition_penalty: must be above 0" in message for message in messages)
    with pytest.raises(EngineError, match="repetition_penalty"):
        Sampling(temperature=0.5, repetition_penalty=0).validate()


def test_the_penalty_lowers_the_odds_of_recent_tokens_and_greedy_ignores_it():
    logits = torch.tensor([2.0, 1.9, -1.0, 0.5])
    original = logits.clone()
    greedy = Sampling(temperature=0.0, repetition_penalty=5.0)
    assert next_token(logits, greedy, None, recent=[0]) == 0  # plain argmax, penalty or not

    sampling = Sampling(temperature=0.05, repetition_penalty=5.0, seed=3)
    generator = make_generator(sampling)
    draws = [next_token(logits, sampling, generator, recent=[0]) for _ in range(50)]
    assert draws.count(1) > 45  # token 0 (the likeliest) was just used, so token 1 wins
    unpenalised = Sampling(temperature=0.05, repetition_penalty=1.0, seed=3)
    generator = make_generator(unpenalised)
    assert [next_token(logits, unpenalised, generator, recent=[0]) for _ in range(50)].count(0) > 35
    assert torch.equal(logits, original)  # the caller's logits are left as they were


def test_the_penalty_looks_at_the_last_window_of_prompt_then_reply():
    prompt, reply = list(range(100)), [500, 501]
    window = recent_ids(prompt, reply)
    assert len(window) == REPETITION_WINDOW and window[-2:] == reply and window[0] == 100 - REPETITION_WINDOW + 2


def test_model_cache_files_become_private(tmp_path):
    old_umask = os.umask(0o022)
    try:
        folder = tmp_path / "models" / "converted" / "m"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    finally:
        os.umask(old_umask)
    make_private_tree(tmp_path / "models")
    for path in (tmp_path / "models", tmp_path / "models" / "converted", folder):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / "config.json").stat().st_mode) == 0o600
