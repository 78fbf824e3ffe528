"""shared-prefix: eight tabs opened with the same ~500-token system prompt, one question each.

Asked one tab after another (as a user opens tabs), twice: with prefix sharing, where tabs 2-8 find
the system prompt's full KV blocks in the pool and prefill only their own tokens, and with sharing
off, where every tab prefills its whole prompt and holds its own copy. Figures: prefilled tokens,
TTFT, and the KV bytes held for the eight, against the bytes of one system prompt plus every tab's
own tokens (the least any store could hold).
"""

from __future__ import annotations

from typing import Any

from chatkv.bench.baselines import generate_with_cache
from chatkv.bench.check import ExactnessCheck, record_check
from chatkv.bench.context import BenchContext
from chatkv.bench.engine_turns import run_turn, running_engine
from chatkv.bench.filler import filler_message
from chatkv.bench.result import ScenarioResult, Table, fmt, times
from chatkv.bench.stats import mean, ratio
from chatkv.conversation import Message

TABS = 8
SYSTEM_TOKENS = 500
NEW_TOKENS = 8
QUESTIONS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Write a haiku about the sea.",
    "What is 2+2?",
    "How does gradient descent work?",
    "Describe neural networks briefly.",
    "What is a prime number?",
    "Why is the sky blue?",
]
MODES = {"shared": "sharing on", "unshared": "sharing off"}


def system_prompt(tokenizer: Any) -> str:
    return "You answer questions about this log.\n" + filler_message(tokenizer, SYSTEM_TOKENS - 10, question="")


def conversation(system: str, tab: int) -> list[Message]:
    return [Message("system", system), Message("user", QUESTIONS[tab % len(QUESTIONS)])]


def run(ctx: BenchContext) -> ScenarioResult:
    bundle = ctx.bundle
    system = system_prompt(bundle.tokenizer)
    result = ScenarioResult("shared-prefix", parameters={
        "tabs": TABS, "target_system_tokens": SYSTEM_TOKENS, "max_new_tokens": NEW_TOKENS, "questions": QUESTIONS,
        "order": "one tab after another, each a new session",
    })
    if not record_check(result, (lambda: _check_exactness(ctx, system)) if ctx.check else None):
        return result
    for mode in MODES:
        ctx.progress(f"shared-prefix: eight tabs, {MODES[mode]}")
        result.figures[mode] = _serve_tabs(ctx, system, share=mode == "shared")
    shared, unshared = result.figures["shared"], result.figures["unshared"]
    result.figures["comparison"] = {
        "later_tabs_ttft_speedup": ratio(unshared["later_tabs_avg_ttft_ms"], shared["later_tabs_avg_ttft_ms"]),
        "bytes_saved_ratio": ratio(unshared["kv_bytes"], shared["kv_bytes"]),
        "later_tabs_prefill_only_own_tokens": all(
            tab["prefilled_tokens"] <= tab["own_tokens"] + shared["block_size"] for tab in shared["per_tab"][1:]
        ),
    }
    result.tables.append(_table(result.figures))
    result.notes.append(
        "minimum_kv_bytes: one system prompt plus every tab's own tokens (question, template, reply), at the pool's "
        "bytes per token; kv_bytes_vs_minimum is what the store held over that (whole blocks, so slightly above 1)."
    )
    return result


def _serve_tabs(ctx: BenchContext, system: str, share: bool) -> dict[str, Any]:
    settings = ctx.engine_settings()
    settings.kv.share_prefixes = share
    tabs: list[dict[str, Any]] = []
    with running_engine(ctx.bundle, settings) as engine:
        run_turn(engine, "bench-shared-warmup", [Message("user", "Say hello.")], 2)
        warmup_bytes = engine.stats().bytes
        system_ids = engine.renderer.render([Message("system", system), Message("user", "")])
        for tab in range(TABS):
            turn, wall_ms = run_turn(engine, f"bench-shared-{tab}", conversation(system, tab), NEW_TOKENS)
            common = _common_prefix(system_ids, turn.prompt_ids)
            tabs.append({
                "tab": tab + 1, "prompt_tokens": turn.prompt_tokens, "reused_tokens": turn.reused_tokens,
                "shared_tokens": turn.shared_tokens, "shared_from": turn.shared_from,
                "prefilled_tokens": turn.prefilled_tokens, "own_tokens": turn.prompt_tokens - common,
                "system_tokens": common, "new_tokens": turn.new_tokens, "ttft_ms": turn.ttft_ms, "latency_ms": wall_ms,
            })
        stats = engine.stats()
        store = engine.store
        held = stats.bytes - warmup_bytes
        session_tokens = sum(tab["prompt_tokens"] + tab["new_tokens"] for tab in tabs)
        minimum_tokens = session_tokens - sum(tab["system_tokens"] for tab in tabs[1:])
        minimum = minimum_tokens * store.layout.bytes_per_token(store.dtype)
        return {
            "per_tab": tabs, "block_size": store.block_size,
            "kv_bytes": held, "minimum_kv_bytes": minimum, "kv_bytes_vs_minimum": ratio(held, minimum),
            "shared_blocks": stats.shared_blocks, "shared_bytes_saved": stats.shared_bytes_saved,
            "reused_tokens_other_session": stats.reused_tokens_other_session,
            "first_tab_ttft_ms": tabs[0]["ttft_ms"],
            "later_tabs_avg_ttft_ms": mean([tab["ttft_ms"] for tab in tabs[1:]]),
            "later_tabs_prefilled_tokens": sum(tab["prefilled_tokens"] for tab in tabs[1:]),
        }


def _common_prefix(a: list[int], b: list[int]) -> int:
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return min(len(a), len(b))


def _table(figures: dict[str, Any]) -> Table:
    shared, unshared = figures["shared"], figures["unshared"]
    table = Table(f"shared-prefix: {TABS} tabs, same system prompt", ["metric", *MODES.values(), "on vs off"])
    table.add("tab 1 TTFT (ms)", fmt(shared["first_tab_ttft_ms"], 1), fmt(unshared["first_tab_ttft_ms"], 1), "")
    table.add("tabs 2-8 avg TTFT (ms)", fmt(shared["later_tabs_avg_ttft_ms"], 1), fmt(unshared["later_tabs_avg_ttft_ms"], 1),
              times(figures["comparison"]["later_tabs_ttft_speedup"]))
    table.add("tabs 2-8 prefilled tokens", fmt(shared["later_tabs_prefilled_tokens"]),
              fmt(unshared["later_tabs_prefilled_tokens"]), "")
    table.add("KV held (MiB)", fmt(shared["kv_bytes"] / 2**20, 1), fmt(unshared["kv_bytes"] / 2**20, 1),
              times(figures["comparison"]["bytes_saved_ratio"]))
    table.add("KV held vs minimum", fmt(shared["kv_bytes_vs_minimum"], 2), fmt(unshared["kv_bytes_vs_minimum"], 2), "")
    return table


def _check_exactness(ctx: BenchContext, system: str) -> ExactnessCheck:
    """fp32: three tabs through chatkv with sharing (the later two reuse the first's blocks) vs model.generate."""
    bundle = ctx.fp32_bundle()
    check = ExactnessCheck("chatkv tabs sharing a system prompt vs model.generate, fp32 greedy")
    with running_engine(bundle, ctx.engine_settings()) as engine:
        for tab in range(3):
            ctx.progress(f"shared-prefix: fp32 exactness check, tab {tab + 1}/3")
            turn, _ = run_turn(engine, f"bench-shared-check-{tab}", conversation(system, tab), NEW_TOKENS)
            expected = generate_with_cache(bundle, list(turn.prompt_ids), NEW_TOKENS).reply_ids
            check.compare(f"tab {tab + 1} reply (shared {turn.shared_tokens} tokens)", expected, list(turn.reply_ids))
    return check
