"""The paged KV pool shares prefixes between sessions, and every shared reply stays token-identical to the reference."""

from __future__ import annotations

import pytest
import torch

from chatkv.config import KvOptions, Settings
from chatkv.conversation import Message
from chatkv.engine import Engine, Sampling
from chatkv.engine.detokenizer import IncrementalDetokenizer
from chatkv.engine.kv_blocks import KvLayout
from chatkv.engine.kv_store import KvStore
from chatkv.engine.reference import greedy_full_recompute
from tests.chat_turns import chat


def long_system_prompt(tokenizer, tokens: int) -> str:
    words = [f"Rule {i}: answer plainly and keep to the facts of topic {i % 7}." for i in range(200)]
    text = ""
    for word in words:
        if len(tokenizer.encode(text + " " + word)) > tokens:
            break
        text = (text + " " + word).strip()
    return text


def assert_exact(bundle, engine, result, max_new_tokens):
    assert result.reply_ids == greedy_full_recompute(bundle.model, result.prompt_ids, max_new_tokens, engine.eos_ids)


@pytest.mark.real_model
def test_real_model_second_tab_with_the_same_500_token_system_prompt_prefills_only_its_own_tokens(real_bundle):
    system = long_system_prompt(real_bundle.tokenizer, 500)
    engine = Engine(real_bundle, Settings()).start()
    try:
        first = chat(engine, "tab-a", [Message("system", system)], "What is the capital of France?")
        second = chat(engine, "tab-b", [Message("system", system)], "Name three colours of the rainbow.")
        stats = engine.stats()
    finally:
        engine.close()
    block = engine.store.block_size
    system_ids = engine.renderer.render([Message("system", system), Message("user", "x")])
    common = next(i for i, (a, b) in enumerate(zip(first.prompt_ids, second.prompt_ids)) if a != b)
    assert common >= 480 and len(system_ids) > 480
    assert first.shared_tokens == 0 and first.reused_tokens == 0
    assert second.shared_tokens == second.reused_tokens == common // block * block
    assert second.shared_from == "tab-a" and second.reused_from == "memory"
    assert second.prefilled_tokens == second.prompt_tokens - second.reused_tokens < block + (second.prompt_tokens - common)
    assert stats.reused_tokens_other_session == second.shared_tokens and stats.shared_blocks == common // block
    for result in (first, second):
        assert_exact(real_bundle, engine, result, 8)


def test_repeated_prompt_in_a_new_session_reuses_its_kv_and_stays_exact(tiny_bundle):
    engine = Engine(tiny_bundle, Settings()).start()
    question = "Write a long list of the rainbow's colours, one per line, with a fact about each of them."
    try:
        first = chat(engine, "seed-1", [], question, max_new_tokens=12)
        again = chat(engine, "seed-2", [], question, max_new_tokens=12)
        stats = engine.stats()
    finally:
        engine.close()
    block = engine.store.block_size
    assert again.prompt_ids == first.prompt_ids
    assert again.reused_tokens == (again.prompt_tokens - 1) // block * block > 0
    assert again.shared_tokens == again.reused_tokens and again.shared_from == "seed-1"
    assert again.reply_ids == first.reply_ids
    assert_exact(tiny_bundle, engine, again, 12)
    assert stats.hit_rate == again.reused_tokens / (first.prompt_tokens + again.prompt_tokens)
    assert stats.reused_tokens_same_session == 0 and stats.reused_tokens_other_session == again.reused_tokens


def test_sharing_off_prefills_every_session_in_full(tiny_bundle):
    settings = Settings()
    settings.kv.share_prefixes = False
    engine = Engine(tiny_bundle, settings).start()
    try:
        chat(engine, "a", [], "The same question, asked twice in two tabs?")
        again = chat(engine, "b", [], "The same question, asked twice in two tabs?")
        stats = engine.stats()
    finally:
        engine.close()
    assert again.reused_tokens == again.shared_tokens == 0 and again.shared_from is None
    assert stats.shared_blocks == 0


def test_fork_kv_shares_the_parent_and_both_continue_exactly(tiny_bundle):
    engine = Engine(tiny_bundle, Settings()).start()
    parent_history: list[Message] = [Message("system", "You are terse.")]
    try:
        assert engine.fork_kv("nobody", "child") == 0
        chat(engine, "parent", parent_history, "Tell me about the moon and its phases, in detail.", max_new_tokens=10)
        parent_tokens = engine.session_stats("parent").tokens
        assert engine.fork_kv("parent", "child") == parent_tokens
        child_history = list(parent_history)
        child = chat(engine, "child", child_history, "Now tell me about the sun.", max_new_tokens=10)
        parent = chat(engine, "parent", parent_history, "And the stars?", max_new_tokens=10)
    finally:
        engine.close()
    assert child.reused_from == "memory" and child.reused_tokens >= parent_tokens - 2
    assert parent.reused_tokens >= parent_tokens - 2  # the child's writes never reached the parent's blocks
    assert_exact(tiny_bundle, engine, child, 10)
    assert_exact(tiny_bundle, engine, parent, 10)


def test_cutting_a_session_back_into_shared_blocks_copies_on_write_and_leaves_the_other_session_intact():
    layout = KvLayout(layers=2, kv_heads=2, head_dim=4)
    store = KvStore(layout, torch.float32, torch.device("cpu"), KvOptions(), block_size=4)
    store.reserve("a", 10)
    store.write(store.peek("a"), 0, torch.randn(2, 2, 2, 10, 4))
    store.commit("a", list(range(10)))
    before = store.session_kv(store.peek("a")).clone()
    assert store.fork("a", "b") == 10
    b = store.peek("b")
    assert b.block_table[:2] == store.peek("a").block_table[:2] and store.shared_blocks == 2
    store.truncate("b", 6)  # inside b's second block, which a shares
    store.reserve("b", 10)
    store.write(b, 6, torch.full((2, 2, 2, 4, 4), 7.0))
    store.commit("b", [60, 70, 80, 90])
    assert torch.equal(store.session_kv(store.peek("a")), before)
    assert torch.equal(store.session_kv(b)[:, :, :, :6], before[:, :, :, :6])
    assert bool((store.session_kv(b)[:, :, :, 6:] == 7.0).all())  # written from a position inside a block
    assert store.shared_blocks == 1 and store.bytes == 5 * store.block_bytes  # a: 3 blocks, b: 2 of its own
    assert store.match_prefix([0, 1, 2, 3, 4, 5, 60, 70, 99], 9) == b.block_table[:2]
    store.drop("a")
    store.drop("b")
    assert store.bytes == 0


def test_evicted_session_restored_from_disk_joins_the_pool_and_shares_with_a_new_session(tiny_bundle, tmp_path):
    settings = Settings()
    engine = Engine(tiny_bundle, settings, snapshot_dir=tmp_path / "kv").start()
    question = "Explain, step by step, how a rainbow forms when sunlight meets falling rain."
    history: list[Message] = []
    try:
        first = chat(engine, "a", history, question)
        engine.call_in_engine(lambda: engine.store.evict("a")).result()
        engine.call_in_engine(lambda: engine.store._by_hash.clear()).result()  # nothing left to find in memory
        restored = chat(engine, "a", history, "Why?")
        newcomer = chat(engine, "b", [], question)
    finally:
        engine.close()
    assert restored.reused_from == "disk" and restored.reused_tokens > first.prompt_tokens
    assert newcomer.shared_from == "a" and newcomer.shared_tokens > 0
    for result in (restored, newcomer):
        assert_exact(tiny_bundle, engine, result, 8)


def test_incremental_detokenizer_streams_exactly_the_text_of_the_whole_reply(real_bundle):
    tokenizer = real_bundle.tokenizer
    text = "Café, naïve — 日本語 and emoji 🚀🌈 over two lines\n\nend."
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.add(token) for token in tokenizer.encode(text)]
    assert "".join(piece for piece in pieces if piece) == tokenizer.decode(tokenizer.encode(text))
    assert None in pieces  # an emoji split over byte tokens is held back until complete
