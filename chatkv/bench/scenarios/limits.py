"""limits: the physical ceilings of this machine for this model, and how close chatkv comes to them.

- Decoding one session reads every weight once per token, so its ceiling is memory read bandwidth /
  weight bytes.
- Many sessions, or a long prompt, share each weight read across tokens; then the ceiling is matmul
  throughput / (2 x parameters) FLOPs per token (attention over the context adds a little more).
  B sessions decoding together are bound by whichever is lower: B x the bandwidth ceiling (one
  weight read per step serves all B; KV reads ignored) or the compute ceiling (a roofline).
Bandwidth is timed on a tensor far larger than the caches; matmul throughput on square matrices in
the model's dtype. Best of several runs, as a ceiling should be.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from chatkv.bench.baselines import generate_with_cache, render_prompt
from chatkv.bench.context import BenchContext
from chatkv.bench.engine_turns import run_together, run_turn, running_engine
from chatkv.bench.filler import filler_message
from chatkv.bench.result import ScenarioResult, Table, fmt
from chatkv.bench.stats import ratio
from chatkv.conversation import Message

MIB = 2**20
MATMUL_SIZE = 1024
DECODE_PROMPT = "Tell me about the history of the bicycle."
PREFILL_TOKENS = 1000


def best_seconds(action: Callable[[], Any], repeats: int, device: torch.device) -> float:
    def timed() -> float:
        started = time.perf_counter()
        action()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # GPU calls return before the work is done
        return time.perf_counter() - started

    timed()  # warm up: first touch of the memory, kernel selection
    return min(timed() for _ in range(repeats))


@torch.inference_mode()
def read_bandwidth(mib: int, device: torch.device, repeats: int = 5) -> float:
    """Bytes per second that summing a large fp32 tensor reads (the sum itself is far cheaper than the read)."""
    data = torch.ones(mib * MIB // 4, dtype=torch.float32, device=device)
    return data.numel() * 4 / best_seconds(data.sum, repeats, device)


@torch.inference_mode()
def matmul_flops(dtype: torch.dtype, device: torch.device, size: int = MATMUL_SIZE, repeats: int = 5) -> float:
    left = torch.randn(size, size, device=device).to(dtype)
    right = torch.randn(size, size, device=device).to(dtype)
    return 2 * size**3 / best_seconds(lambda: left @ right, repeats, device)


def run(ctx: BenchContext) -> ScenarioResult:
    bundle = ctx.bundle
    sizes = ctx.sizes
    parameters = sum(p.numel() for p in bundle.model.parameters())  # tied embeddings count once
    weight_bytes = sum(p.numel() * p.element_size() for p in bundle.model.parameters())
    result = ScenarioResult("limits", parameters={
        "dtype": str(bundle.dtype).removeprefix("torch."), "model_parameters": parameters, "weight_bytes": weight_bytes,
        "bandwidth_tensor_mib": sizes.limits_read_mib, "matmul_size": MATMUL_SIZE, "threads": torch.get_num_threads(),
        "decode_tokens": sizes.limits_decode_tokens, "batch_sessions": sizes.limits_batch_sessions,
        "decode_rounds": sizes.limits_rounds, "decode_figure": "best of the rounds, as for the ceilings",
        "prefill_tokens": PREFILL_TOKENS,
    })

    ctx.progress(f"limits: memory read bandwidth ({sizes.limits_read_mib} MiB tensor)")
    bandwidth = read_bandwidth(sizes.limits_read_mib, bundle.device)
    ctx.progress(f"limits: matmul throughput ({MATMUL_SIZE}x{MATMUL_SIZE}, {result.parameters['dtype']})")
    flops = matmul_flops(bundle.dtype, bundle.device)
    ceilings = {
        "single_decode_tok_s": bandwidth / weight_bytes,
        "compute_tok_s": flops / (2 * parameters),
    }
    ceilings["batched_decode_tok_s"] = min(sizes.limits_batch_sessions * ceilings["single_decode_tok_s"],
                                           ceilings["compute_tok_s"])
    result.figures["machine"] = {"read_bandwidth_bytes_s": bandwidth, "matmul_flops": flops}
    result.figures["ceilings"] = ceilings
    result.figures["chatkv"], result.figures["generate"] = _measure(ctx)

    chatkv = result.figures["chatkv"]
    result.figures["fraction_of_ceiling"] = {
        "single_decode": ratio(chatkv["single_decode_tok_s"], ceilings["single_decode_tok_s"]),
        "batched_decode": ratio(chatkv["batched_decode_tok_s"], ceilings["batched_decode_tok_s"]),
        "prefill": ratio(chatkv["prefill_tok_s"], ceilings["compute_tok_s"]),
    }
    result.tables.append(_table(result.figures, sizes.limits_batch_sessions))
    result.notes.append(
        f"measured: {bandwidth / 1e9:,.1f} GB/s memory read, {flops / 1e9:,.0f} GFLOP/s matmul in "
        f"{result.parameters['dtype']}; weights {weight_bytes / MIB:,.0f} MiB, {parameters / 1e6:,.1f} M parameters.")
    result.notes.append("Single-session decode pays fixed per-step costs (Python, dispatch, small-matrix "
                        "inefficiency) that the bandwidth ceiling ignores; batching spreads them over sessions.")
    return result


def _measure(ctx: BenchContext) -> tuple[dict[str, Any], dict[str, Any]]:
    """chatkv's single-session decode (against model.generate, taking turns), batched decode and prefill."""
    sizes = ctx.sizes
    bundle = ctx.bundle
    tokens = sizes.limits_decode_tokens
    prompt_ids = render_prompt(bundle.tokenizer, [{"role": "user", "content": DECODE_PROMPT}])
    settings = ctx.engine_settings(max_batch_size=max(sizes.limits_batch_sessions, ctx.settings.batching.max_batch_size))
    single: dict[str, list[float]] = {"chatkv": [], "generate": []}
    with running_engine(bundle, settings) as engine:
        run_turn(engine, "bench-limits-warmup", [Message("user", "Say hello.")], 2)
        generate_with_cache(bundle, prompt_ids, 2)
        for round_number in range(sizes.limits_rounds):
            ctx.progress(f"limits: one session decoding {tokens} tokens, model.generate then chatkv "
                         f"({round_number + 1}/{sizes.limits_rounds})")
            generation = generate_with_cache(bundle, prompt_ids, tokens)
            if generation.new_tokens > 1:
                single["generate"].append((generation.new_tokens - 1) / (generation.decode_ms / 1000))
            turn, _ = run_turn(engine, f"bench-limits-single-{round_number}", [Message("user", DECODE_PROMPT)], tokens)
            if turn.new_tokens > 1:
                single["chatkv"].append(turn.decode_tok_s)
        ctx.progress(f"limits: chatkv decoding {sizes.limits_batch_sessions} sessions together")
        turns = [(f"bench-limits-{i}", [Message("user", f"{DECODE_PROMPT} Answer number {i + 1}.")])
                 for i in range(sizes.limits_batch_sessions)]
        batch, wall_s = run_together(engine, turns, tokens)
        ctx.progress(f"limits: chatkv prefilling a {PREFILL_TOKENS:,}-token prompt")
        long_message = filler_message(bundle.tokenizer, PREFILL_TOKENS)
        prefill, _ = run_turn(engine, "bench-limits-prefill", [Message("user", long_message)], 1)
    # decode starts once every session has its first token (they are prefilled together), so time after the
    # slowest first token is decode time; each session's first token came from prefill
    decode_span_s = wall_s - max(turn.ttft_ms for turn in batch) / 1000
    decoded = sum(max(0, turn.new_tokens - 1) for turn in batch)
    chatkv = {
        "single_decode_tok_s": max(single["chatkv"], default=None),
        "single_decode_tok_s_rounds": single["chatkv"],
        "batched_decode_tok_s": decoded / decode_span_s if decode_span_s > 0 else None,
        "batched_new_tokens": sum(turn.new_tokens for turn in batch),
        "prefill_tokens": prefill.prefilled_tokens,
        "prefill_tok_s": prefill.prefilled_tokens / (prefill.ttft_ms / 1000),
    }
    generate = {"single_decode_tok_s": max(single["generate"], default=None),
                "single_decode_tok_s_rounds": single["generate"]}
    return chatkv, generate


def _table(figures: dict[str, Any], batch_sessions: int) -> Table:
    ceilings, chatkv, share = figures["ceilings"], figures["chatkv"], figures["fraction_of_ceiling"]
    table = Table("limits: ceilings implied by this machine vs measured",
                  ["workload", "ceiling tok/s", "chatkv tok/s", "of ceiling", "model.generate tok/s"])

    def percent(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.0f}%"

    table.add("decode, 1 session (bandwidth-bound)", fmt(ceilings["single_decode_tok_s"]),
              fmt(chatkv["single_decode_tok_s"]), percent(share["single_decode"]),
              fmt(figures["generate"]["single_decode_tok_s"]))
    table.add(f"decode, {batch_sessions} sessions together (roofline)", fmt(ceilings["batched_decode_tok_s"]),
              fmt(chatkv["batched_decode_tok_s"]), percent(share["batched_decode"]), "-")
    table.add(f"prefill, {chatkv['prefill_tokens']:,}-token prompt (compute-bound)", fmt(ceilings["compute_tok_s"]),
              fmt(chatkv["prefill_tok_s"]), percent(share["prefill"]), "-")
    return table
