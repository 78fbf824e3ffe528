"""speed: single-stream decode beside llama.cpp's ``llama-bench`` (tg64 on the same GGUF) and ``model.generate``.

llama.cpp is the speed anchor for one chat on a CPU. When a ``llama-bench`` binary is found (``--llama-bench
PATH``, else ``PATH``, else the folder ``scripts/build_llama_cpp.sh`` builds into), it runs text generation
of 64 tokens (``-p 0 -n 64``) on the GGUF chatkv converted its default model from, with as many threads
as chatkv's engine; then chatkv decodes a free-form reply, timed from its first streamed token to its last
(the engine's token stream), and ``model.generate`` bf16 does the same reply, taking turns; then the same
reply is timed through the App itself (headless chatkv in a child process, ``chatkv.bench.app_stream``),
the rate a user sees.
Then a reply that quotes its context (a pasted paragraph and "repeat it word for word"), where speculative
decoding's prompt-lookup guesses pay, is timed the same way with guessing on and off: tok/s, acceptance
rate, and whether the two replies are token-identical.
Without a binary the scenario still measures chatkv and ``generate`` and says llama.cpp was not found.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
from pathlib import Path
from typing import Any

from chatkv.bench.app_stream import AppStreamError, app_decode_rates
from chatkv.bench.baselines import generate_with_cache, render_prompt
from chatkv.bench.context import BenchContext
from chatkv.bench.engine_turns import run_turn, running_engine
from chatkv.bench.result import ScenarioResult, Table, fmt, times
from chatkv.bench.stats import ratio
from chatkv.config import SpeculativeOptions
from chatkv.conversation import Message
from chatkv.engine.threads import engine_threads
from chatkv.model.source import find_default_gguf

FREE_FORM_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
QUOTED_PARAGRAPH = (
    "The lighthouse stood on a rock at the edge of the bay, and for forty years the same family kept its lamp "
    "burning. Every evening the keeper climbed the one hundred and twelve steps, trimmed the wick, wound the "
    "clockwork that turned the lens, and wrote the weather in a leather book. Ships that passed at night saw the "
    "beam sweep the water every ten seconds and knew where the reef began."
)
QUOTE_PROMPT = QUOTED_PARAGRAPH + "\n\nRepeat the paragraph above word for word."
LLAMA_BENCH_TOKENS = 64
BUILD_FOLDER = Path.home() / ".cache" / "chatkv-build"  # where scripts/build_llama_cpp.sh installs


def find_llama_bench(given: str | None) -> Path | None:
    """The ``llama-bench`` to run: the one given, else on PATH, else the newest build of scripts/build_llama_cpp.sh."""
    if given:
        path = Path(given).expanduser()
        return path if path.is_file() else None
    on_path = shutil.which("llama-bench")
    if on_path:
        return Path(on_path)
    built = sorted(BUILD_FOLDER.glob("llama.cpp-*/bin/llama-bench"))
    return built[-1] if built else None


def run_llama_bench(binary: Path, gguf: Path, threads: int, repetitions: int) -> dict[str, Any]:
    """tg64 with ``threads`` threads: mean and spread of tok/s over ``repetitions`` runs, as llama-bench reports them."""
    command = [str(binary), "-m", str(gguf), "-p", "0", "-n", str(LLAMA_BENCH_TOKENS), "-t", str(threads),
               "-r", str(repetitions), "-o", "json"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if completed.returncode != 0:
        raise RuntimeError(f"llama-bench exited {completed.returncode}: {completed.stderr.strip()[-400:]}")
    rows = json.loads(completed.stdout)
    row = next(row for row in rows if row.get("n_gen") == LLAMA_BENCH_TOKENS)
    return {"tg_tok_s": float(row["avg_ts"]), "tg_tok_s_stddev": float(row.get("stddev_ts", 0.0)),
            "threads": threads, "command": " ".join(command), "model_type": row.get("model_type"),
            "build": row.get("build_commit")}


def run(ctx: BenchContext) -> ScenarioResult:
    bundle = ctx.bundle
    sizes = ctx.sizes
    threads = engine_threads(ctx.settings.model.threads)
    tokens = max(sizes.limits_decode_tokens, 2)
    result = ScenarioResult("speed", parameters={
        "weights": bundle.fingerprint.dtype, "threads": threads, "decode_tokens": tokens,
        "rounds": sizes.limits_rounds, "prompt": FREE_FORM_PROMPT, "llama_bench_tokens": LLAMA_BENCH_TOKENS,
        "chatkv_timing": "first to last streamed token of the reply (the engine's token stream)",
        "figure": "median of the rounds",
    })
    binary = find_llama_bench(ctx.llama_bench)
    gguf = find_default_gguf(ctx.models_dir)
    llama: dict[str, Any] | None = None
    if binary is None:
        result.notes.append("llama.cpp: no llama-bench found (give --llama-bench PATH, put it on PATH, or build it "
                            "with scripts/build_llama_cpp.sh); chatkv and model.generate measured alone.")
    elif gguf is None:
        result.notes.append("llama.cpp: the default model's GGUF is not in the model cache; run `chatkv model pull`.")
    else:
        ctx.progress(f"speed: llama-bench tg{LLAMA_BENCH_TOKENS} on {gguf.name}, {_threads(threads)}")
        try:
            llama = run_llama_bench(binary, gguf, threads, max(2, sizes.limits_rounds))
        except (OSError, RuntimeError, ValueError, StopIteration, subprocess.TimeoutExpired) as exc:
            result.notes.append(f"llama.cpp: llama-bench did not give a figure: {exc}")

    prompt_ids = render_prompt(bundle.tokenizer, [{"role": "user", "content": FREE_FORM_PROMPT}])
    chatkv_rates: list[float] = []
    generate_rates: list[float] = []
    with running_engine(bundle, ctx.engine_settings()) as engine:
        run_turn(engine, "bench-speed-warmup", [Message("user", "Say hello.")], 2)
        generate_with_cache(bundle, prompt_ids, 2)
        for round_number in range(sizes.limits_rounds):
            ctx.progress(f"speed: chatkv then model.generate, {tokens} tokens ({round_number + 1}/{sizes.limits_rounds})")
            turn, _ = run_turn(engine, f"bench-speed-{round_number}", [Message("user", FREE_FORM_PROMPT)], tokens)
            if turn.new_tokens > 1:
                chatkv_rates.append(turn.decode_tok_s)
            generation = generate_with_cache(bundle, prompt_ids, tokens)
            if generation.new_tokens > 1:
                generate_rates.append((generation.new_tokens - 1) / (generation.decode_ms / 1000))
    quote = _quoting_reply(ctx, tokens)
    chatkv = {"decode_tok_s": _median(chatkv_rates), "decode_tok_s_rounds": chatkv_rates}
    app = _through_the_app(ctx, tokens, threads, result)
    generate = {"decode_tok_s": _median(generate_rates), "decode_tok_s_rounds": generate_rates,
                "dtype": str(bundle.model.dtype).removeprefix("torch.")}
    result.parameters["draft_tokens"] = ctx.settings.speculative.draft_tokens
    result.parameters["quote_prompt"] = QUOTE_PROMPT
    result.figures = {"chatkv": chatkv, "generate": generate, "llama_cpp": llama or {}, "quote": quote,
                      "chatkv_app": app}
    result.figures["comparison"] = {
        "chatkv_app_vs_generate": ratio(app["decode_tok_s"], generate["decode_tok_s"]),
        "chatkv_app_vs_llama_cpp": ratio(app["decode_tok_s"], llama["tg_tok_s"]) if llama else None,
        "quote_app_vs_llama_cpp": ratio(app["quote_decode_tok_s"], llama["tg_tok_s"]) if llama else None,
        "chatkv_vs_generate": ratio(chatkv["decode_tok_s"], generate["decode_tok_s"]),
        "chatkv_vs_llama_cpp": ratio(chatkv["decode_tok_s"], llama["tg_tok_s"]) if llama else None,
        "quote_vs_llama_cpp": ratio(quote["decode_tok_s"], llama["tg_tok_s"]) if llama else None,
        "quote_no_draft_vs_llama_cpp": ratio(quote["no_draft"]["decode_tok_s"], llama["tg_tok_s"]) if llama else None,
        "quote_draft_speedup": ratio(quote["decode_tok_s"], quote["no_draft"]["decode_tok_s"]),
    }
    if not quote["identical_to_no_draft"]:
        result.notes.append("quote: the replies with and without speculative decoding differ; they are token-identical "
                            "in fp32, while bf16 and quantized kernels may round differently for different row counts")
    result.tables.append(_table(result.figures, bundle.fingerprint.dtype, threads))
    return result


def _through_the_app(ctx: BenchContext, tokens: int, threads: int, result: ScenarioResult) -> dict[str, Any]:
    """The free-form and the quoting reply timed through the App's token stream (headless chatkv in a child
    process, same model, weights, threads and ``draft_tokens``), taking turns."""
    ctx.progress(f"speed: both replies through the App (headless chatkv), {ctx.sizes.limits_rounds} rounds")
    options = ["--model", ctx.model_spec, "--dtype", str(ctx.bundle.dtype).removeprefix("torch."),
               "--quant", ctx.settings.model.quant, "--threads", str(threads),
               "--draft-tokens", str(ctx.settings.speculative.draft_tokens)]
    try:
        rates = app_decode_rates(ctx.models_dir, {"free-form": FREE_FORM_PROMPT, "quote": QUOTE_PROMPT}, tokens,
                                 ctx.sizes.limits_rounds, options)
    except (AppStreamError, OSError) as exc:
        result.notes.append(f"the App's token stream was not timed: {exc}")
        rates = {"free-form": [], "quote": []}
    return {"decode_tok_s": _median(rates["free-form"]), "decode_tok_s_rounds": rates["free-form"],
            "quote_decode_tok_s": _median(rates["quote"]), "quote_decode_tok_s_rounds": rates["quote"],
            "command": "chatkv launch --headless --ephemeral --stream " + " ".join(options)}


def _quoting_reply(ctx: BenchContext, tokens: int) -> dict[str, Any]:
    """The reply that repeats a pasted paragraph, timed like the free-form one, with guessing on, then off.

    Guessing on uses the configured ``draft_tokens`` (the default where the configuration turns it off).
    """
    draft_tokens = ctx.settings.speculative.draft_tokens or SpeculativeOptions().draft_tokens
    runs: dict[int, dict[str, Any]] = {}
    for k in (draft_tokens, 0):
        settings = ctx.engine_settings()
        settings.speculative.draft_tokens = k
        rates: list[float] = []
        with running_engine(ctx.bundle, settings) as engine:
            run_turn(engine, "bench-quote-warmup", [Message("user", "Say hello.")], 2)
            for round_number in range(ctx.sizes.limits_rounds):
                ctx.progress(f"speed: chatkv repeating a paragraph, draft_tokens={k} "
                             f"({round_number + 1}/{ctx.sizes.limits_rounds})")
                turn, _ = run_turn(engine, f"bench-quote-{k}-{round_number}", [Message("user", QUOTE_PROMPT)], tokens)
                if turn.new_tokens > 1:
                    rates.append(turn.decode_tok_s)
            stats = engine.stats()
        runs[k] = {"decode_tok_s": _median(rates), "decode_tok_s_rounds": rates, "new_tokens": turn.new_tokens,
                   "reply_ids": turn.reply_ids, "drafted_tokens": stats.drafted_tokens,
                   "accepted_draft_tokens": stats.accepted_draft_tokens,
                   "draft_acceptance_rate": stats.draft_acceptance_rate}
    on, off = runs[draft_tokens], runs[0]
    return {
        "draft_tokens": draft_tokens,
        "decode_tok_s": on["decode_tok_s"],
        "decode_tok_s_rounds": on["decode_tok_s_rounds"],
        "new_tokens": on["new_tokens"],
        "drafted_tokens": on["drafted_tokens"],
        "accepted_draft_tokens": on["accepted_draft_tokens"],
        "draft_acceptance_rate": on["draft_acceptance_rate"],
        "identical_to_no_draft": on["reply_ids"] == off["reply_ids"],
        "no_draft": {"decode_tok_s": off["decode_tok_s"], "decode_tok_s_rounds": off["decode_tok_s_rounds"],
                     "new_tokens": off["new_tokens"]},
    }


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _table(figures: dict[str, Any], weights: str, threads: int) -> Table:
    comparison = figures["comparison"]
    table = Table(f"speed: one stream decoding ({_threads(threads)})", ["system", "tok/s", "chatkv is"])
    table.add(f"chatkv ({weights}), engine's token stream", fmt(figures["chatkv"]["decode_tok_s"]), "")
    table.add("chatkv through the App (headless), same reply", fmt(figures["chatkv_app"]["decode_tok_s"]), "")
    table.add(f"model.generate ({figures['generate']['dtype']})", fmt(figures["generate"]["decode_tok_s"]),
              f"{times(comparison['chatkv_vs_generate'])} (App {times(comparison['chatkv_app_vs_generate'])})")
    llama = figures["llama_cpp"]
    table.add(f"llama.cpp llama-bench tg{LLAMA_BENCH_TOKENS}", fmt(llama.get("tg_tok_s")) if llama else "not run",
              f"{times(comparison['chatkv_vs_llama_cpp'])} (App {times(comparison['chatkv_app_vs_llama_cpp'])})"
              if llama else "")
    quote = figures["quote"]
    same = "identical" if quote["identical_to_no_draft"] else "DIFFERENT"
    table.add(f"chatkv quoting, draft_tokens={quote['draft_tokens']} (accepts {quote['draft_acceptance_rate']:.0%}, "
              f"reply {same})", fmt(quote["decode_tok_s"]), times(comparison["quote_vs_llama_cpp"]))
    table.add("chatkv quoting, no guesses", fmt(quote["no_draft"]["decode_tok_s"]),
              times(comparison["quote_no_draft_vs_llama_cpp"]))
    table.add(f"chatkv quoting through the App, draft_tokens={quote['draft_tokens']}",
              fmt(figures["chatkv_app"]["quote_decode_tok_s"]), times(comparison["quote_app_vs_llama_cpp"]))
    return table


def _threads(count: int) -> str:
    return f"{count} thread" if count == 1 else f"{count} threads"
