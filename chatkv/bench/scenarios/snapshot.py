"""snapshot: the next turn of a long conversation whose KV comes back from disk, against recomputing it.

A long conversation (a pasted log and a short reply) is served once and its KV snapshotted to a
temporary folder; then its next turn is asked three ways, each timed to its first token:
- from disk: a fresh engine (as after a restart) restores the snapshot and prefills only the new message;
- recomputed: a fresh engine without snapshots prefills the whole conversation;
- from memory: the engine that served it still holds its KV (the best case, for reference).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from chatkv.bench.context import BenchContext
from chatkv.bench.engine_turns import run_turn, running_engine
from chatkv.bench.filler import filler_message
from chatkv.bench.result import ScenarioResult, Table, fmt, times
from chatkv.bench.stats import mean, ratio
from chatkv.conversation import Message

SESSION = "bench-snapshot"
FIRST_REPLY_TOKENS = 16
NEXT_MESSAGE = "Which entries were about memory use, and what changed?"
NEXT_REPLY_TOKENS = 8
WAYS = {"disk": "restored from disk", "recompute": "recomputed", "memory": "still in memory"}


def run(ctx: BenchContext) -> ScenarioResult:
    sizes = ctx.sizes
    bundle = ctx.bundle
    result = ScenarioResult("snapshot", parameters={
        "target_conversation_tokens": sizes.snapshot_tokens, "repeats": sizes.snapshot_repeats,
        "first_reply_tokens": FIRST_REPLY_TOKENS, "next_message": NEXT_MESSAGE, "next_reply_tokens": NEXT_REPLY_TOKENS,
    })
    history = [Message("user", filler_message(bundle.tokenizer, sizes.snapshot_tokens - FIRST_REPLY_TOKENS - 40))]
    samples: dict[str, list[dict[str, Any]]] = {way: [] for way in WAYS}
    with tempfile.TemporaryDirectory(prefix="chatkv-bench-snapshots-") as folder:
        snapshot_settings = ctx.engine_settings()
        snapshot_settings.snapshot.enabled = True
        with running_engine(bundle, snapshot_settings, Path(folder)) as engine:
            ctx.progress("snapshot: serving the long conversation once and writing its snapshot")
            first, _ = run_turn(engine, SESSION, history, FIRST_REPLY_TOKENS)
            history.append(Message("assistant", first.reply, token_ids=list(first.reply_ids)))
            written = engine.snapshot([SESSION])
            disk_bytes = engine.stats().disk_bytes
            conversation = history + [Message("user", NEXT_MESSAGE)]
            for repeat in range(sizes.snapshot_repeats):
                ctx.progress(f"snapshot: next turn from memory ({repeat + 1}/{sizes.snapshot_repeats})")
                samples["memory"].append(_sample(*run_turn(engine, SESSION, conversation, NEXT_REPLY_TOKENS)))
        for repeat in range(sizes.snapshot_repeats):
            ctx.progress(f"snapshot: next turn restored from disk by a fresh engine ({repeat + 1}/{sizes.snapshot_repeats})")
            with running_engine(bundle, snapshot_settings, Path(folder)) as engine:
                samples["disk"].append(_sample(*run_turn(engine, SESSION, conversation, NEXT_REPLY_TOKENS)))
            ctx.progress(f"snapshot: next turn recomputed by a fresh engine ({repeat + 1}/{sizes.snapshot_repeats})")
            with running_engine(bundle, ctx.engine_settings()) as engine:
                samples["recompute"].append(_sample(*run_turn(engine, SESSION, conversation, NEXT_REPLY_TOKENS)))

    result.parameters.update(conversation_tokens=first.prompt_tokens + first.new_tokens,
                             next_prompt_tokens=samples["disk"][0]["prompt_tokens"])
    for way in WAYS:
        rows = samples[way]
        result.figures[way] = {"avg_ttft_ms": mean([r["ttft_ms"] for r in rows]), "samples": rows}
    result.figures["snapshot_file"] = {"written": written, "disk_bytes": disk_bytes}
    restored_everywhere = all(r["reused_from"] == "disk" for r in samples["disk"])
    result.figures["comparison"] = {
        "disk_vs_recompute_ttft_speedup": ratio(result.figures["recompute"]["avg_ttft_ms"], result.figures["disk"]["avg_ttft_ms"]),
        "memory_vs_recompute_ttft_speedup": ratio(result.figures["recompute"]["avg_ttft_ms"], result.figures["memory"]["avg_ttft_ms"]),
        "restored_from_disk": restored_everywhere,
        "same_reply_disk_and_recompute": all(d["reply_ids"] == r["reply_ids"] for d, r in zip(samples["disk"], samples["recompute"])),
    }
    if not restored_everywhere:
        result.status = "error"
        result.reason = "the fresh engine did not restore the snapshot from disk (reused_from was not 'disk')"
    result.tables.append(_table(result.figures, result.parameters))
    result.notes.append(f"snapshot file: {fmt(disk_bytes / 2**20)} MiB for {result.parameters['conversation_tokens']:,} tokens.")
    return result


def _sample(turn: Any, wall_ms: float) -> dict[str, Any]:
    return {"ttft_ms": turn.ttft_ms, "prompt_tokens": turn.prompt_tokens, "reused_tokens": turn.reused_tokens,
            "prefilled_tokens": turn.prefilled_tokens, "reused_from": turn.reused_from, "total_ms": wall_ms,
            "reply_ids": list(turn.reply_ids)}


def _table(figures: dict[str, Any], parameters: dict[str, Any]) -> Table:
    table = Table(f"snapshot: next turn of a {parameters['conversation_tokens']:,}-token conversation",
                  ["KV", "TTFT (ms)", "prefilled tokens", "vs recomputed"])
    for way, label in WAYS.items():
        sample = figures[way]["samples"][0]
        table.add(label, fmt(figures[way]["avg_ttft_ms"]), fmt(sample["prefilled_tokens"]),
                  times(ratio(figures["recompute"]["avg_ttft_ms"], figures[way]["avg_ttft_ms"])))
    return table
