"""branching: regenerate, edit-at-middle and fork on a long conversation, against the same prompts recomputed.

A long conversation (a pasted log, then short turns) is served once. Then three turns are timed to
their first token, each in the engine that holds the conversation's KV and again in an engine with
the KV cache off (the same prompt recomputed):
- regenerate: the last turn's prompt again (its reply is replaced);
- edit at middle: the middle user message rewritten, everything after it dropped;
- fork: a new session sharing the parent's KV blocks (``Engine.fork_kv``) and sent a new message.
Memory: the KV bytes held by the parent plus 3 forks (each answering one new message), against 4
independent sessions that each served the whole conversation (prefix sharing off, so each holds its
own copy).
"""

from __future__ import annotations

from typing import Any

from chatkv.bench.context import BenchContext
from chatkv.bench.engine_turns import run_turn, running_engine
from chatkv.bench.filler import filler_message
from chatkv.bench.result import ScenarioResult, Table, fmt, times
from chatkv.bench.stats import mean, ratio
from chatkv.conversation import Message
from chatkv.engine import Engine

PARENT = "bench-branching"
SHORT_TURNS = ("Which entries were about tests?", "And which about memory use?", "Which ones mention customers?",
               "Anything about the on-call handover?")
EDITED = "Which entries were about build times?"
FORK_MESSAGES = ("Summarise the log in one sentence.", "List three risks it shows.", "Which team should act first?")
REPLY_TOKENS = 8
KINDS = {"regenerate": "regenerate", "edit": "edit at middle", "fork": "fork's first turn"}


def run(ctx: BenchContext) -> ScenarioResult:
    sizes = ctx.sizes
    bundle = ctx.bundle
    result = ScenarioResult("branching", parameters={
        "target_conversation_tokens": sizes.branching_tokens, "repeats": sizes.branching_repeats,
        "short_turns": len(SHORT_TURNS), "reply_tokens": REPLY_TOKENS, "forks": len(FORK_MESSAGES),
    })
    filler = filler_message(bundle.tokenizer, sizes.branching_tokens - 200)
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {kind: {"cached": [], "recomputed": []} for kind in KINDS}
    with running_engine(bundle, ctx.engine_settings()) as engine:
        ctx.progress("branching: serving the long conversation")
        history = _converse(engine, PARENT, [filler, *SHORT_TURNS])
        conversation_tokens = engine.session_stats(PARENT).tokens
        prompts = _branch_prompts(history)
        with running_engine(bundle, _no_cache(ctx)) as recompute:
            for repeat in range(sizes.branching_repeats):
                ctx.progress(f"branching: regenerate, edit, fork from cache and recomputed ({repeat + 1}/{sizes.branching_repeats})")
                for kind, messages in prompts.items():
                    session = PARENT if kind != "fork" else f"{PARENT}-fork-{repeat}"
                    if kind == "fork":
                        engine.fork_kv(PARENT, session)
                    cached = _sample(*run_turn(engine, session, messages, REPLY_TOKENS))
                    if kind == "edit":  # the parent's KV back to the whole conversation, for the fork
                        run_turn(engine, PARENT, history[:-1], REPLY_TOKENS)
                    elif kind == "fork":
                        engine.forget(session)
                    samples[kind]["cached"].append(cached)
                    samples[kind]["recomputed"].append(_sample(*run_turn(recompute, f"{PARENT}-{kind}", messages, REPLY_TOKENS)))

        ctx.progress("branching: KV bytes of a parent and 3 forks")
        parent_bytes = engine.stats().bytes
        for number, text in enumerate(FORK_MESSAGES):
            child = f"{PARENT}-child-{number}"
            engine.fork_kv(PARENT, child)
            run_turn(engine, child, history + [Message("user", text)], REPLY_TOKENS)
        forked_bytes = engine.stats().bytes
        shared_bytes_saved = engine.stats().shared_bytes_saved
    ctx.progress("branching: KV bytes of 4 independent copies")
    with running_engine(bundle, _no_sharing(ctx)) as engine:
        for number, text in enumerate(("", *FORK_MESSAGES)):
            session = f"{PARENT}-copy-{number}"
            run_turn(engine, session, history[:-1], REPLY_TOKENS)  # the whole conversation, prefilled at once
            if text:
                run_turn(engine, session, history + [Message("user", text)], REPLY_TOKENS)
        copies_bytes = engine.stats().bytes

    result.parameters.update(conversation_tokens=conversation_tokens)
    for kind in KINDS:
        for way in ("cached", "recomputed"):
            rows = samples[kind][way]
            result.figures.setdefault(kind, {})[way] = {"avg_ttft_ms": mean([r["ttft_ms"] for r in rows]), "samples": rows}
        result.figures[kind]["ttft_speedup"] = ratio(result.figures[kind]["recomputed"]["avg_ttft_ms"],
                                                     result.figures[kind]["cached"]["avg_ttft_ms"])
        result.figures[kind]["same_reply"] = all(c["reply_ids"] == r["reply_ids"]
                                                 for c, r in zip(samples[kind]["cached"], samples[kind]["recomputed"]))
    result.figures["memory"] = {
        "parent_bytes": parent_bytes, "parent_and_3_forks_bytes": forked_bytes, "shared_bytes_saved": shared_bytes_saved,
        "4_independent_copies_bytes": copies_bytes, "forks_vs_copies": ratio(forked_bytes, copies_bytes),
    }
    result.tables.extend(_tables(result.figures, conversation_tokens))
    result.notes.append("forks share the parent's full KV blocks (Engine.fork_kv: reference-counted, copied on "
                        "write), so the common prefix is held once; the 4 independent copies run with prefix "
                        "sharing off.")
    return result


def _converse(engine: Engine, session: str, texts: list[str]) -> list[Message]:
    """Serve one turn per text; the whole conversation, each reply with its exact token ids."""
    history: list[Message] = []
    for text in texts:
        history.append(Message("user", text))
        turn, _ = run_turn(engine, session, history, REPLY_TOKENS)
        history.append(Message("assistant", turn.reply, token_ids=list(turn.reply_ids)))
    return history


def _branch_prompts(history: list[Message]) -> dict[str, list[Message]]:
    user_positions = [index for index, message in enumerate(history) if message.role == "user"]
    middle = user_positions[len(user_positions) // 2]
    return {
        "regenerate": history[:-1],
        "edit": history[:middle] + [Message("user", EDITED)],
        "fork": history + [Message("user", FORK_MESSAGES[0])],
    }


def _no_cache(ctx: BenchContext):
    settings = ctx.engine_settings()
    settings.kv.enabled = False
    return settings


def _no_sharing(ctx: BenchContext):
    settings = ctx.engine_settings()
    settings.kv.share_prefixes = False
    return settings


def _sample(turn: Any, wall_ms: float) -> dict[str, Any]:
    return {"ttft_ms": turn.ttft_ms, "prompt_tokens": turn.prompt_tokens, "reused_tokens": turn.reused_tokens,
            "prefilled_tokens": turn.prefilled_tokens, "shared_tokens": turn.shared_tokens, "total_ms": wall_ms,
            "reply_ids": list(turn.reply_ids)}


def _tables(figures: dict[str, Any], conversation_tokens: int) -> list[Table]:
    ttft = Table(f"branching: a {conversation_tokens:,}-token conversation",
                 ["turn", "TTFT cached (ms)", "prefilled", "TTFT recomputed (ms)", "prefilled", "speed-up", "same reply"])
    for kind, label in KINDS.items():
        cached, recomputed = figures[kind]["cached"], figures[kind]["recomputed"]
        ttft.add(label, fmt(cached["avg_ttft_ms"]), fmt(cached["samples"][0]["prefilled_tokens"]),
                 fmt(recomputed["avg_ttft_ms"]), fmt(recomputed["samples"][0]["prefilled_tokens"]),
                 times(figures[kind]["ttft_speedup"]), fmt(figures[kind]["same_reply"]))
    memory = figures["memory"]
    kv = Table("branching: KV held", ["sessions", "KV (MiB)"])
    kv.add("parent alone", fmt(memory["parent_bytes"] / 2**20))
    kv.add("parent + 3 forks", fmt(memory["parent_and_3_forks_bytes"] / 2**20))
    kv.add("4 independent copies", fmt(memory["4_independent_copies_bytes"] / 2**20))
    return [ttft, kv]
