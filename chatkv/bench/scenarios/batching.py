"""batching: many sessions generating at once, one shared forward pass per step, against one at a time.

- sequential: the headline number of sessions served one after another, by plain ``model.generate``
  and by chatkv (one turn in flight at a time);
- batched: the same sessions submitted together to chatkv, at several session counts, in both
  continuous batching (prefill and decode shared, sessions join and leave between steps) and the
  seed design's prefill-only mode (prefill shared, then each session decodes alone).
Aggregate tok/s = all new tokens / wall time from the first submit to the last token.
"""

from __future__ import annotations

from typing import Any

from chatkv.bench.baselines import generate_with_cache, render_prompt
from chatkv.bench.check import ExactnessCheck, record_check
from chatkv.bench.context import BenchContext
from chatkv.bench.engine_turns import run_together, run_turn, running_engine
from chatkv.bench.result import ScenarioResult, Table, fmt, times
from chatkv.bench.stats import ratio
from chatkv.conversation import Message

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a refrigerator keeps food cold.",
    "Describe a good morning routine for a student.",
    "What makes a bridge strong enough to carry trains?",
    "Give advice to someone learning to cook at home.",
    "Explain why the sky is blue to a ten-year-old.",
    "Describe the water cycle step by step.",
    "What should I look for when buying a used bicycle?",
    "Write a short poem about autumn leaves.",
    "How do vaccines train the immune system?",
    "Explain the rules of chess in a few sentences.",
    "What are the benefits of learning a second language?",
    "Describe how bread rises when it is baked.",
    "Give tips for writing a clear email at work.",
    "Why do cats purr, according to scientists?",
    "Explain what a budget is and why it helps.",
]
WARMUP_PROMPT = "Say hello."
MODES = {"continuous": False, "prefill_only": True}  # mode name -> batching.prefill_only


def run(ctx: BenchContext) -> ScenarioResult:
    sizes = ctx.sizes
    levels, headline, new_tokens = list(sizes.batching_levels), sizes.batching_headline, sizes.batching_new_tokens
    max_batch = max(levels)
    result = ScenarioResult("batching", parameters={
        "levels": levels, "headline_sessions": headline, "max_new_tokens": new_tokens,
        "max_batch_size": max_batch, "max_batch_wait_ms": ctx.settings.batching.max_batch_wait_ms,
        "prompts": PROMPTS[:max_batch],
        "aggregate": "all new tokens / wall time from the first submit to the last token",
    })
    if not record_check(result, (lambda: _check_exactness(ctx, headline, new_tokens, max_batch)) if ctx.check else None):
        return result

    result.figures.update(_sequential(ctx, headline, new_tokens, max_batch))
    sequential = result.figures["generate_sequential"]
    by_mode: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    for sessions in levels:  # the two modes take turns per level, so noise hits both alike
        for mode, prefill_only in MODES.items():
            ctx.progress(f"batching: chatkv {mode.replace('_', '-')}, {sessions} session(s) together")
            by_mode[mode].append(_together(ctx, sessions, new_tokens, max_batch, prefill_only))
    for mode, rows in by_mode.items():
        result.figures[f"chatkv_{mode}"] = {"by_sessions": rows}

    headline_rows = {mode: _at(result.figures[f"chatkv_{mode}"], headline) for mode in MODES}
    result.figures["comparison"] = {
        "sessions": headline,
        "continuous_vs_generate_sequential": ratio(headline_rows["continuous"]["tok_s"], sequential["tok_s"]),
        "continuous_vs_chatkv_sequential": ratio(headline_rows["continuous"]["tok_s"],
                                                 result.figures["chatkv_sequential"]["tok_s"]),
        "prefill_only_vs_generate_sequential": ratio(headline_rows["prefill_only"]["tok_s"], sequential["tok_s"]),
        "continuous_vs_prefill_only": ratio(headline_rows["continuous"]["tok_s"], headline_rows["prefill_only"]["tok_s"]),
    }
    result.tables.extend(_tables(result.figures, headline))
    comparison = result.figures["comparison"]
    result.notes.append(
        f"{headline} sessions: chatkv batched gives {times(comparison['continuous_vs_generate_sequential'])} the aggregate "
        f"tok/s of model.generate one session at a time (the seed design claimed 5x at 8 requests; its prefill-only "
        f"mode gives {times(comparison['prefill_only_vs_generate_sequential'])} here).")
    if max_batch != ctx.settings.batching.max_batch_size:
        result.notes.append(f"max_batch_size is {max_batch} in this scenario so every level can share one pass "
                            f"(configured: {ctx.settings.batching.max_batch_size}).")
    return result


def _sequential(ctx: BenchContext, sessions: int, new_tokens: int, max_batch: int) -> dict[str, dict[str, Any]]:
    """The sessions one after another, model.generate and chatkv taking turns per session so noise hits both alike."""
    bundle = ctx.bundle
    totals = {"generate_sequential": [0, 0.0], "chatkv_sequential": [0, 0.0]}  # tokens, seconds
    with running_engine(bundle, ctx.engine_settings(max_batch_size=max_batch)) as engine:
        generate_with_cache(bundle, render_prompt(bundle.tokenizer, [{"role": "user", "content": WARMUP_PROMPT}]), 2)
        run_turn(engine, "bench-batching-warmup", [Message("user", WARMUP_PROMPT)], 2)
        for index in range(sessions):
            ctx.progress(f"batching: one session at a time, model.generate then chatkv, session {index + 1}/{sessions}")
            prompt_ids = render_prompt(bundle.tokenizer, [{"role": "user", "content": PROMPTS[index]}])
            generation = generate_with_cache(bundle, prompt_ids, new_tokens)
            totals["generate_sequential"][0] += generation.new_tokens
            totals["generate_sequential"][1] += generation.total_ms / 1000
            turn, wall_ms = run_turn(engine, f"bench-seq-{index}", [Message("user", PROMPTS[index])], new_tokens)
            totals["chatkv_sequential"][0] += turn.new_tokens
            totals["chatkv_sequential"][1] += wall_ms / 1000
    return {name: {"sessions": sessions, "new_tokens": tokens, "wall_s": seconds, "tok_s": tokens / seconds}
            for name, (tokens, seconds) in totals.items()}


def _together(ctx: BenchContext, sessions: int, new_tokens: int, max_batch: int, prefill_only: bool) -> dict[str, Any]:
    """``sessions`` new sessions submitted at once to a fresh engine (after one warm-up turn)."""
    settings = ctx.engine_settings(max_batch_size=max_batch, prefill_only=prefill_only)
    with running_engine(ctx.bundle, settings) as engine:
        run_turn(engine, "bench-batching-warmup", [Message("user", WARMUP_PROMPT)], 2)
        before = engine.stats()
        turns = [(f"bench-batch-{i}", [Message("user", PROMPTS[i])]) for i in range(sessions)]
        results, wall_s = run_together(engine, turns, new_tokens)
        after = engine.stats()
    generated = sum(r.new_tokens for r in results)
    return {
        "sessions": sessions, "new_tokens": generated, "wall_s": wall_s, "tok_s": generated / wall_s,
        "forward_passes": after.forward_passes - before.forward_passes,
        # sessions served per forward pass during this level (the warm-up turn excluded)
        "avg_sessions_per_forward": _sessions_per_forward(before, after),
        "avg_ttft_ms": sum(r.ttft_ms for r in results) / len(results),
        "prefill_batch_sizes": [r.batch_size for r in results],
    }


def _sessions_per_forward(before: Any, after: Any) -> float | None:
    """The engine's average batch size over this level alone: its running average, minus the warm-up's share."""
    passes = after.forward_passes - before.forward_passes
    if passes <= 0:
        return None
    served = after.avg_batch_size * after.forward_passes - before.avg_batch_size * before.forward_passes
    return served / passes


def _at(mode_figures: dict[str, Any], sessions: int) -> dict[str, Any]:
    return next(row for row in mode_figures["by_sessions"] if row["sessions"] == sessions)


def _tables(figures: dict[str, Any], headline: int) -> list[Table]:
    sequential = figures["generate_sequential"]
    headline_table = Table(f"batching: {headline} sessions, aggregate tok/s", ["system", "tok/s", "vs generate one at a time"])
    headline_table.add("model.generate, one at a time", fmt(sequential["tok_s"]), times(1.0))
    headline_table.add("chatkv, one at a time", fmt(figures["chatkv_sequential"]["tok_s"]),
                       times(ratio(figures["chatkv_sequential"]["tok_s"], sequential["tok_s"])))
    for mode, label in (("continuous", "chatkv, continuous batching"), ("prefill_only", "chatkv, prefill-only batching")):
        row = _at(figures[f"chatkv_{mode}"], headline)
        headline_table.add(label, fmt(row["tok_s"]), times(ratio(row["tok_s"], sequential["tok_s"])))

    scaling = Table("batching: scaling with sessions submitted together",
                    ["sessions", "continuous tok/s", "per pass", "prefill-only tok/s", "per pass", "continuous / prefill-only"])
    for continuous, prefill_only in zip(figures["chatkv_continuous"]["by_sessions"], figures["chatkv_prefill_only"]["by_sessions"]):
        scaling.add(continuous["sessions"], fmt(continuous["tok_s"]), fmt(continuous["avg_sessions_per_forward"], 2),
                    fmt(prefill_only["tok_s"]), fmt(prefill_only["avg_sessions_per_forward"], 2),
                    times(ratio(continuous["tok_s"], prefill_only["tok_s"])))
    return [headline_table, scaling]


def _check_exactness(ctx: BenchContext, sessions: int, new_tokens: int, max_batch: int) -> ExactnessCheck:
    """fp32: the sessions submitted together, in both modes, against model.generate on each prompt alone."""
    bundle = ctx.fp32_bundle()
    check = ExactnessCheck(f"{sessions} sessions batched (continuous and prefill-only) vs model.generate alone, fp32 greedy")
    expected = []
    for index in range(sessions):
        ctx.progress(f"batching: fp32 exactness check, model.generate {index + 1}/{sessions}")
        prompt_ids = render_prompt(bundle.tokenizer, [{"role": "user", "content": PROMPTS[index]}])
        expected.append(generate_with_cache(bundle, prompt_ids, new_tokens).reply_ids)
    for mode, prefill_only in MODES.items():
        ctx.progress(f"batching: fp32 exactness check, chatkv {mode.replace('_', '-')}")
        with running_engine(bundle, ctx.engine_settings(max_batch_size=max_batch, prefill_only=prefill_only)) as engine:
            turns = [(f"bench-check-{i}", [Message("user", PROMPTS[i])]) for i in range(sessions)]
            results, _ = run_together(engine, turns, new_tokens)
        for index, turn in enumerate(results):
            check.compare(f"session {index + 1} ({mode})", expected[index], list(turn.reply_ids))
    return check
