"""``chatkv bench --backend URL [multiturn] [batching]``: the same scenarios against a remote server.

So a user can compare their GPU box (or a llama.cpp server) with local chatkv in one command: the same
conversation and the same prompts as the local scenarios, through the same ``RemoteBackend`` the app
uses. The figures are client-side (TTFT and wall time from submit, tok/s from what arrived) beside the
server's own count of cached prompt tokens, None where the server does not report it.

- multiturn: one conversation, turn after turn; per turn its prompt, the server's cached tokens, TTFT.
- batching: the headline number of sessions one at a time, then submitted together at each level;
  aggregate tok/s = all new tokens / wall time from the first submit to the last token.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from chatkv import __version__
from chatkv.bench.report import Progress, render_scenario
from chatkv.bench.result import ScenarioResult, Table, fmt, times
from chatkv.bench.sizes import Sizes, choose_sizes
from chatkv.bench.stats import ratio, slope
from chatkv.conversation import Message
from chatkv.engine.api import EngineError, Sampling, TurnResult

NAMES = ("multiturn", "batching")
WARMUP = "Say hello."


def run_remote_bench(context: Any) -> int:
    from chatkv.remote.backend import RemoteBackend, api_key_from_env

    args, options = context.args, context.settings.backend
    names = list(dict.fromkeys(args.scenarios)) or list(NAMES)
    unknown = [name for name in names if name not in NAMES]
    if unknown:
        print(f"chatkv bench: with --backend the scenarios are {', '.join(NAMES)} (the others measure the local "
              f"engine itself); not {', '.join(unknown)}", file=sys.stderr)
        return 2
    progress = Progress()
    try:
        backend = RemoteBackend(options, api_key_from_env(options.api_key_env)).start()
    except EngineError as exc:
        print(f"chatkv bench: {exc}", file=sys.stderr)
        return 2
    with backend:
        notes = backend.probe()
        if not backend.info.reachable or not backend.default_model:
            print(f"chatkv bench: {' '.join(notes) or 'the server lists no models; name one with --model'}", file=sys.stderr)
            return 1
        for note in notes:
            progress(note)
        sizes = choose_sizes(args.quick)
        machine = {"backend": options.url, "server": backend.info.kind, "model": backend.default_model,
                   "client_python": platform.python_version(), "size": sizes.label}
        started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        started = time.perf_counter()
        results: dict[str, ScenarioResult] = {}
        for name in names:
            progress(f"{name}: starting against {options.url} ({sizes.label} size)")
            scenario_started = time.perf_counter()
            try:
                results[name] = SCENARIOS[name](backend, sizes, progress)
            except RuntimeError as exc:  # a turn the server failed: the message says why
                results[name] = ScenarioResult(name, status="error", reason=str(exc))
            results[name].seconds = time.perf_counter() - scenario_started
            progress(f"{name}: {results[name].status} in {results[name].seconds:.1f} s")
    print(f"server: {machine['server']} at {machine['backend']}, model {machine['model']}")
    for result in results.values():
        print(f"\n{render_scenario(result)}")
    if args.json_path:
        document = {
            "machine": machine,
            "run": {"chatkv": __version__, "started": started_at, "seconds": round(time.perf_counter() - started, 3),
                    "size": sizes.label, "scenarios": names, "command": f"chatkv bench --backend {options.url} {' '.join(names)}"},
            "scenarios": {name: result.to_json() for name, result in results.items()},
        }
        Path(args.json_path).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        progress(f"wrote {args.json_path}")
    failed = [name for name, result in results.items() if result.status == "error"]
    if failed:
        print(f"chatkv bench: {', '.join(failed)} did not complete; see above", file=sys.stderr)
        return 1
    return 0


def _run(backend, turns: list[tuple[str, list[Message]]], new_tokens: int) -> tuple[list[TurnResult], float]:
    """Submit every turn at once, wait for all; results and wall seconds. A failed turn raises RuntimeError."""
    started = time.perf_counter()
    handles = [backend.submit(session, messages, Sampling(max_new_tokens=new_tokens)) for session, messages in turns]
    results = [handle.wait(600) for handle in handles]
    wall_s = time.perf_counter() - started
    for result in results:
        if result.finish_reason == "error":
            raise RuntimeError(f"the server failed a turn: {result.error}")
    return results, wall_s


def multiturn(backend, sizes: Sizes, progress) -> ScenarioResult:
    from chatkv.bench.scenarios.multiturn import USER_MESSAGES

    turns, new_tokens = sizes.multiturn_turns, sizes.multiturn_new_tokens
    result = ScenarioResult("multiturn", parameters={"turns": turns, "max_new_tokens": new_tokens, "server": backend.info.kind})
    _run(backend, [("bench-remote-warmup", [Message("user", WARMUP)])], 2)
    messages: list[Message] = []
    rows = []
    for number, text in enumerate(USER_MESSAGES[:turns], start=1):
        progress(f"multiturn: turn {number}/{turns}")
        messages.append(Message("user", text))
        [turn], wall_s = _run(backend, [("bench-remote-multiturn", list(messages))], new_tokens)
        messages.append(Message("assistant", turn.reply))
        rows.append({"turn": number, "prompt_tokens": turn.prompt_tokens, "reused_tokens": turn.reused_tokens,
                     "prefilled_tokens": turn.prefilled_tokens, "ttft_ms": turn.ttft_ms, "total_ms": wall_s * 1000,
                     "new_tokens": turn.new_tokens})
    reported = [row for row in rows[1:] if row["prompt_tokens"] and row["reused_tokens"] is not None]
    prompts = [row["prompt_tokens"] for row in rows if row["prompt_tokens"] is not None]
    result.figures["server"] = {
        "per_turn": rows,
        "first_turn_ttft_ms": rows[0]["ttft_ms"],
        "last_turn_ttft_ms": rows[-1]["ttft_ms"],
        "last_turn_prompt_tokens": rows[-1]["prompt_tokens"],
        # token-level hit rate from turn 2 on, as the server reported it (None if it reported nothing)
        "hit_rate_from_turn_2": (sum(r["reused_tokens"] for r in reported) / sum(r["prompt_tokens"] for r in reported)
                                 if reported else None),
        "ttft_ms_per_1k_prompt_tokens": (1000 * slope(prompts, [r["ttft_ms"] for r in rows])
                                         if len(prompts) == len(rows) else None),
    }
    table = Table("multiturn against the server: TTFT per turn", ["turn", "prompt", "cached (server)", "TTFT (ms)"])
    for row in rows:
        table.add(row["turn"], fmt(row["prompt_tokens"]), fmt(row["reused_tokens"]), fmt(row["ttft_ms"]))
    result.tables.append(table)
    figures = result.figures["server"]
    result.notes.append(
        f"turn {turns}: TTFT {fmt(figures['last_turn_ttft_ms'])} ms for {fmt(figures['last_turn_prompt_tokens'])} prompt "
        f"tokens; the server served {fmt(None if figures['hit_rate_from_turn_2'] is None else 100 * figures['hit_rate_from_turn_2'])}% "
        "of the prompt tokens from turn 2 on from its cache.")
    return result


def batching(backend, sizes: Sizes, progress) -> ScenarioResult:
    from chatkv.bench.scenarios.batching import PROMPTS

    levels, headline, new_tokens = list(sizes.batching_levels), sizes.batching_headline, sizes.batching_new_tokens
    result = ScenarioResult("batching", parameters={
        "levels": levels, "headline_sessions": headline, "max_new_tokens": new_tokens, "server": backend.info.kind,
        "aggregate": "all new tokens / wall time from the first submit to the last token",
    })
    _run(backend, [("bench-remote-warmup", [Message("user", WARMUP)])], 2)
    tokens, seconds = 0, 0.0
    for index in range(headline):
        progress(f"batching: one session at a time, {index + 1}/{headline}")
        [turn], wall_s = _run(backend, [(f"bench-remote-seq-{index}", [Message("user", PROMPTS[index])])], new_tokens)
        tokens, seconds = tokens + turn.new_tokens, seconds + wall_s
    result.figures["server_sequential"] = {"sessions": headline, "new_tokens": tokens, "wall_s": seconds, "tok_s": tokens / seconds}
    rows = []
    for sessions in levels:
        progress(f"batching: {sessions} session(s) together")
        turns = [(f"bench-remote-batch-{sessions}-{i}", [Message("user", PROMPTS[i % len(PROMPTS)])]) for i in range(sessions)]
        results, wall_s = _run(backend, turns, new_tokens)
        generated = sum(r.new_tokens for r in results)
        rows.append({"sessions": sessions, "new_tokens": generated, "wall_s": wall_s, "tok_s": generated / wall_s,
                     "avg_ttft_ms": sum(r.ttft_ms for r in results) / len(results)})
    result.figures["server_together"] = {"by_sessions": rows}
    sequential = result.figures["server_sequential"]["tok_s"]
    at_headline = next((row for row in rows if row["sessions"] == headline), rows[-1])
    result.figures["comparison"] = {"sessions": at_headline["sessions"],
                                    "together_vs_sequential": ratio(at_headline["tok_s"], sequential)}
    table = Table("batching against the server: aggregate tok/s", ["sessions", "tok/s", "avg TTFT (ms)", "vs one at a time"])
    table.add("1 at a time", fmt(sequential), "-", times(1.0))
    for row in rows:
        table.add(f"{row['sessions']} together", fmt(row["tok_s"]), fmt(row["avg_ttft_ms"]), times(ratio(row["tok_s"], sequential)))
    result.tables.append(table)
    result.notes.append(f"{at_headline['sessions']} sessions together: "
                        f"{times(result.figures['comparison']['together_vs_sequential'])} the aggregate tok/s of one at a time.")
    return result


SCENARIOS = {"multiturn": multiturn, "batching": batching}
