"""KV snapshots through the engine: spill on eviction, save on demand, restore in a new engine, fall back when invalid."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatkv.config import Settings
from chatkv.conversation import Message
from chatkv.engine import Engine
from chatkv.engine.reference import greedy_full_recompute

from chat_turns import chat


@pytest.mark.real_model
def test_a_new_engine_restores_the_conversation_kv_from_disk_and_replies_exactly(real_bundle, tmp_path: Path):
    history: list[Message] = []
    first = Engine(real_bundle, Settings(), snapshot_dir=tmp_path).start()
    try:
        for text in ("Name a fruit.", "What colour is it?", "Is it sweet?"):
            chat(first, "chat", history, text, 12)
        cached_tokens = first.session_stats("chat").tokens
        assert first.snapshot() == 1
    finally:
        first.close()

    second = Engine(real_bundle, Settings(), snapshot_dir=tmp_path).start()  # nothing in memory
    try:
        result = chat(second, "chat", history, "Where does it grow?", 12)
        stats = second.stats()
    finally:
        second.close()
    assert result.reused_from == "disk"
    assert result.reused_tokens == cached_tokens  # the whole previous conversation
    assert result.prefilled_tokens == result.prompt_tokens - cached_tokens
    assert stats.disk_restores == 1 and stats.disk_reused_tokens == cached_tokens
    assert result.reply_ids == greedy_full_recompute(real_bundle.model, result.prompt_ids, 12, second.eos_ids)


def test_evicted_sessions_spill_to_disk_and_come_back_from_there(tiny_bundle, tmp_path: Path):
    settings = Settings()
    settings.kv.max_sessions = 1
    engine = Engine(tiny_bundle, settings, snapshot_dir=tmp_path).start()
    histories = {"a": [], "b": []}
    try:
        chat(engine, "a", histories["a"], "first")
        tokens_a = engine.session_stats("a").tokens
        chat(engine, "b", histories["b"], "second")  # evicts a, which is written to disk
        assert engine.session_stats("a").resident is False
        assert engine.session_stats("a").on_disk_bytes > 0
        result = chat(engine, "a", histories["a"], "again")
    finally:
        engine.close()
    assert result.reused_from == "disk" and result.reused_tokens == tokens_a
    assert result.reply_ids == greedy_full_recompute(tiny_bundle.model, result.prompt_ids, 8, engine.eos_ids)


def test_a_snapshot_whose_tokens_do_not_match_the_conversation_is_ignored_with_a_message(tiny_bundle, tmp_path: Path):
    messages: list[str] = []
    engine = Engine(tiny_bundle, Settings(), snapshot_dir=tmp_path, log=messages.append).start()
    try:
        chat(engine, "a", [], "the original conversation")
        engine.snapshot()
    finally:
        engine.close()
    fresh = Engine(tiny_bundle, Settings(), snapshot_dir=tmp_path, log=messages.append).start()
    try:
        result = chat(fresh, "a", [], "a different conversation under the same id")
    finally:
        fresh.close()
    assert result.reused_from == "none" and result.reused_tokens == 0
    assert any("do not match" in message for message in messages)
    assert result.reply_ids == greedy_full_recompute(tiny_bundle.model, result.prompt_ids, 8, fresh.eos_ids)


def test_a_corrupted_snapshot_falls_back_to_recompute_with_a_message(tiny_bundle, tmp_path: Path):
    messages: list[str] = []
    history: list[Message] = []
    engine = Engine(tiny_bundle, Settings(), snapshot_dir=tmp_path, log=messages.append).start()
    try:
        chat(engine, "a", history, "remember this")
        engine.snapshot()
    finally:
        engine.close()
    snapshot_file = tmp_path / "a.safetensors"
    data = bytearray(snapshot_file.read_bytes())
    data[-20] ^= 0xFF  # flip bytes in the KV data
    snapshot_file.write_bytes(bytes(data))
    fresh = Engine(tiny_bundle, Settings(), snapshot_dir=tmp_path, log=messages.append).start()
    try:
        result = chat(fresh, "a", history, "what was it?")
    finally:
        fresh.close()
    assert result.reused_from == "none" and result.reused_tokens == 0
    assert any("ignored" in message for message in messages)
    assert result.reply_ids == greedy_full_recompute(tiny_bundle.model, result.prompt_ids, 8, fresh.eos_ids)


def test_forgetting_a_session_removes_its_kv_in_memory_and_on_disk(tiny_bundle, tmp_path: Path):
    engine = Engine(tiny_bundle, Settings(), snapshot_dir=tmp_path).start()
    try:
        chat(engine, "a", [], "to be deleted")
        engine.snapshot()
        assert (tmp_path / "a.safetensors").exists()
        engine.forget("a")
        assert engine.session_stats("a").resident is False
    finally:
        engine.close()
    assert not (tmp_path / "a.safetensors").exists()


def test_snapshots_disabled_write_nothing(tiny_bundle, tmp_path: Path):
    settings = Settings()
    settings.snapshot.enabled = False
    engine = Engine(tiny_bundle, settings, snapshot_dir=tmp_path).start()
    try:
        chat(engine, "a", [], "no snapshots please")
        assert engine.snapshot() == 0
    finally:
        engine.close()
    assert not list(tmp_path.glob("*.safetensors"))
