"""seed: the KV-cache report's set-up, reproduced: 5 prompts, each asked several times, greedy, fixed new tokens.

Three columns, measured request by request in turn (so a noisy neighbour slows them all alike):
- no KV cache: every new token recomputes the whole sequence (the report's baseline);
- model.generate: a KV cache inside each request, thrown away after it (the report's "with cache");
- chatkv: every request is a new chatkv session (as a new tab would be); asking a prompt again finds
  the full KV blocks of that prompt, which the earlier request's session computed, in the shared pool
  (cross-request caching), so it prefills only the prompt's last partial block and decodes.
"""

from __future__ import annotations

from typing import Any

from chatkv.bench.baselines import Generation, generate_with_cache, generate_without_cache, render_prompt
from chatkv.bench.check import ExactnessCheck, record_check
from chatkv.bench.context import BenchContext
from chatkv.bench.engine_turns import run_turn, running_engine
from chatkv.bench.result import ScenarioResult, Table, fmt, times
from chatkv.bench.stats import latency_summary, mean, percentile, ratio
from chatkv.conversation import Message

PROMPTS = [
    "Explain what machine learning is in simple terms",
    "What is the difference between AI and ML?",
    "Describe neural networks briefly",
    "How does gradient descent work?",
    "What are transformers in deep learning?",
]
WARMUP_PROMPT = "Say hello."

SYSTEMS = {"no_cache": "no KV cache", "generate": "model.generate", "chatkv": "chatkv"}


def session_id(prompt_index: int, repeat: int) -> str:
    return f"bench-seed-{prompt_index}-{repeat}"


def run(ctx: BenchContext) -> ScenarioResult:
    new_tokens, repeats = ctx.sizes.seed_new_tokens, ctx.sizes.seed_repeats
    result = ScenarioResult("seed", parameters={
        "prompts": PROMPTS, "repeats": repeats, "requests": len(PROMPTS) * repeats, "max_new_tokens": new_tokens,
        "decoding": "greedy, stops at the end-of-turn token or max_new_tokens", "order": "repeat by repeat, prompt by prompt",
        "chatkv_sessions": "one per request; a repeat reuses the prompt's KV blocks that an earlier session computed",
    })
    if not record_check(result, (lambda: _check_exactness(ctx, new_tokens)) if ctx.check else None):
        return result

    bundle = ctx.bundle
    order = [(repeat, index) for repeat in range(repeats) for index in range(len(PROMPTS))]
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in SYSTEMS}
    with running_engine(bundle, ctx.engine_settings()) as engine:
        _warm_up(ctx, engine)
        for number, (repeat, index) in enumerate(order, start=1):
            ctx.progress(f"seed: request {number}/{len(order)} (prompt {index + 1}, repeat {repeat + 1})")
            messages = [Message("user", PROMPTS[index])]
            prompt_ids = render_prompt(bundle.tokenizer, [{"role": "user", "content": PROMPTS[index]}])
            samples["no_cache"].append(_baseline_sample(generate_without_cache(bundle, prompt_ids, new_tokens), repeat, index))
            samples["generate"].append(_baseline_sample(generate_with_cache(bundle, prompt_ids, new_tokens), repeat, index))
            turn, wall_ms = run_turn(engine, session_id(index, repeat), messages, new_tokens)
            samples["chatkv"].append({
                "prompt": index, "repeat": repeat, "latency_ms": wall_ms, "ttft_ms": turn.ttft_ms,
                "decode_ms": wall_ms - turn.ttft_ms, "new_tokens": turn.new_tokens, "prompt_tokens": turn.prompt_tokens,
                "reused_tokens": turn.reused_tokens, "prefilled_tokens": turn.prefilled_tokens,
                "reused_from": turn.reused_from, "shared_tokens": turn.shared_tokens, "shared_from": turn.shared_from,
            })
        stats = engine.stats()

    for name in SYSTEMS:
        result.figures[name] = _summarize(samples[name])
    chatkv = result.figures["chatkv"]
    chatkv["hit_rate"] = ratio(chatkv["reused_tokens"], chatkv["prompt_tokens"])
    chatkv["engine_forward_passes"] = stats.forward_passes
    result.figures["comparison"] = {
        f"chatkv_vs_{name}": {
            "latency_speedup": ratio(result.figures[name]["avg_ms"], chatkv["avg_ms"]),
            "tok_s_speedup": ratio(chatkv["tok_s"], result.figures[name]["tok_s"]),
            "ttft_speedup": ratio(result.figures[name]["avg_ttft_ms"], chatkv["avg_ttft_ms"]),
        }
        for name in ("no_cache", "generate")
    }
    result.tables.append(_table(result.figures))
    result.notes.append(
        "chatkv: each request is a new session; a repeated prompt finds its KV blocks, computed by the earlier "
        f"request's session, in the shared pool (hit rate {fmt(100 * (chatkv['hit_rate'] or 0))}% of prompt tokens; "
        "the first ask of each prompt is cold)."
    )
    result.notes.append("Requests run one at a time, the three systems in turn for each request; latency is wall time "
                        "from the call to the last token, TTFT to the first, decode time the difference.")
    return result


def _warm_up(ctx: BenchContext, engine: Any) -> None:
    """One untimed request on each side, on a prompt outside the set, so first-call set-up is not billed to request 1."""
    ids = render_prompt(ctx.bundle.tokenizer, [{"role": "user", "content": WARMUP_PROMPT}])
    generate_without_cache(ctx.bundle, ids, 2)
    generate_with_cache(ctx.bundle, ids, 2)
    run_turn(engine, "bench-seed-warmup", [Message("user", WARMUP_PROMPT)], 2)


def _baseline_sample(generation: Generation, repeat: int, index: int) -> dict[str, Any]:
    return {"prompt": index, "repeat": repeat, "latency_ms": generation.total_ms, "ttft_ms": generation.ttft_ms,
            "decode_ms": generation.decode_ms, "new_tokens": generation.new_tokens,
            "prompt_tokens": len(generation.prompt_ids)}


def _summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    latencies = [s["latency_ms"] for s in samples]
    ttfts = [s["ttft_ms"] for s in samples]
    total_s = sum(latencies) / 1000
    figures: dict[str, Any] = latency_summary(latencies)
    figures.update(
        requests=len(samples),
        req_s=len(samples) / total_s,
        tok_s=sum(s["new_tokens"] for s in samples) / total_s,
        avg_ttft_ms=mean(ttfts),
        p50_ttft_ms=percentile(ttfts, 50),
        avg_decode_ms=mean([s["decode_ms"] for s in samples]),
        new_tokens=sum(s["new_tokens"] for s in samples),
        prompt_tokens=sum(s["prompt_tokens"] for s in samples),
    )
    if "reused_tokens" in samples[0]:
        figures["reused_tokens"] = sum(s["reused_tokens"] for s in samples)
        figures["prefilled_tokens"] = sum(s["prefilled_tokens"] for s in samples)
    figures["per_request"] = samples
    return figures


def _table(figures: dict[str, Any]) -> Table:
    table = Table(f"seed: {figures['chatkv']['requests']} requests, greedy",
                  ["metric", *SYSTEMS.values(), "chatkv vs no cache", "chatkv vs generate"])
    rows = [
        ("avg latency (ms)", "avg_ms", False), ("P50 latency (ms)", "p50_ms", False),
        ("P95 latency (ms)", "p95_ms", False), ("P99 latency (ms)", "p99_ms", False),
        ("throughput (req/s)", "req_s", True), ("tokens/s", "tok_s", True),
        ("avg TTFT (ms)", "avg_ttft_ms", False), ("P50 TTFT (ms)", "p50_ttft_ms", False),
        ("avg decode time (ms)", "avg_decode_ms", False),
    ]
    for label, key, higher_is_better in rows:
        values = [figures[name][key] for name in SYSTEMS]
        speedups = [ratio(figures["chatkv"][key], v) if higher_is_better else ratio(v, figures["chatkv"][key])
                    for v in values[:2]]
        table.add(label, *(fmt(v, 2 if key.endswith("_s") else 1) for v in values), *(times(s) for s in speedups))
    table.add("new tokens (total)", *(fmt(figures[name]["new_tokens"]) for name in SYSTEMS), "", "")
    return table


def _check_exactness(ctx: BenchContext, new_tokens: int) -> ExactnessCheck:
    """fp32: each prompt through model.generate, and through two new chatkv sessions (cold, then reusing the first's KV)."""
    bundle = ctx.fp32_bundle()
    check = ExactnessCheck("chatkv, cold and reusing its KV, vs model.generate, fp32 greedy")
    with running_engine(bundle, ctx.engine_settings()) as engine:
        for index, prompt in enumerate(PROMPTS):
            ctx.progress(f"seed: fp32 exactness check, prompt {index + 1}/{len(PROMPTS)}")
            prompt_ids = render_prompt(bundle.tokenizer, [{"role": "user", "content": prompt}])
            expected = generate_with_cache(bundle, prompt_ids, new_tokens).reply_ids
            for attempt in ("cold", "reused"):
                turn, _ = run_turn(engine, f"bench-check-{index}-{attempt}", [Message("user", prompt)], new_tokens)
                check.compare(f"prompt {index + 1} chatkv prompt ids ({attempt})", prompt_ids, list(turn.prompt_ids))
                check.compare(f"prompt {index + 1} chatkv reply ({attempt})", expected, list(turn.reply_ids))
    return check
