"""multiturn: one conversation of many turns, chatkv against a plain transformers chat loop.

The loop is what a Python user writes: keep the history as text, render it with the chat template
each turn, and ``model.generate`` from scratch, so every turn re-reads the whole history. chatkv
keeps the session's KV and the model's exact reply ids, so each turn prefills only the new message.
The two are not compared token by token: re-rendering a reply as text re-tokenizes it (SmolLM2's
double-newline token comes back as two), so the loop's prompts, and then its replies, may drift.
"""

from __future__ import annotations

from typing import Any

from chatkv.bench.baselines import generate_with_cache, render_prompt, stop_token_ids
from chatkv.bench.context import BenchContext
from chatkv.bench.engine_turns import run_turn, running_engine
from chatkv.bench.result import ScenarioResult, Table, fmt, times
from chatkv.bench.stats import ratio, slope
from chatkv.conversation import Message

# About 40 tokens each: a conversation that keeps building on itself, as a real chat does.
USER_MESSAGES = [
    "I am planning a week-long cycling trip along a river in late spring. What should I think about first "
    "when choosing the route, and how far is reasonable to ride each day?",
    "Good points. I am fairly fit but have never done more than two days in a row. How should I train "
    "over the next six weeks so the trip feels comfortable rather than exhausting?",
    "What gear would you pack for the bike itself? I want to carry everything in two rear panniers and a "
    "small handlebar bag, and keep the total weight reasonable.",
    "Let us talk about clothing. Spring weather by the river can change quickly, with rain in the morning "
    "and sun in the afternoon. What layers would you bring for that?",
    "I would like to camp on most nights but stay in a guesthouse every third night. How would you plan "
    "the stops, and what should I check before booking the guesthouses?",
    "What should I eat during long riding days? I tend to forget to eat until I am already tired, and I "
    "do not want to carry too much food with me.",
    "If I get a flat tyre or a broken chain far from a town, what tools and spare parts let me fix it "
    "myself, and what repairs should I practise at home before I leave?",
    "How do I keep my phone and lights charged for a whole week when I will only have mains power on the "
    "guesthouse nights? Is a dynamo hub worth the cost for one trip?",
    "My friend wants to join for the middle three days only. How can we arrange the route so she can "
    "arrive and leave by train without us losing a whole day?",
    "What are the most common mistakes people make on their first multi-day bike tour, and which of "
    "them do you think I am most likely to make, given what I have told you?",
    "Could you now sum up the plan we discussed as a short checklist, grouped by what to do six weeks "
    "before, one week before, the day before and during the trip itself?",
    "Thank you. Last question: if the weather forecast turns really bad for the first two days, should I "
    "postpone the whole trip, shorten it, or ride anyway with extra precautions?",
]
WARMUP_MESSAGE = "Say hello."


def run(ctx: BenchContext) -> ScenarioResult:
    turns, new_tokens = ctx.sizes.multiturn_turns, ctx.sizes.multiturn_new_tokens
    bundle = ctx.bundle
    result = ScenarioResult("multiturn", parameters={
        "turns": turns, "max_new_tokens": new_tokens, "user_message_tokens": [
            len(bundle.tokenizer.encode(text, add_special_tokens=False)) for text in USER_MESSAGES[:turns]],
        "baseline": "plain transformers chat loop: history as text, apply_chat_template, model.generate from scratch",
    })
    result.check = {"passed": None, "skipped": True, "summary": (
        "not compared token by token: the baseline re-renders the history as text, which re-tokenizes the model's "
        "replies, so its prompts and replies may legitimately drift from chatkv's")}

    stops = set(stop_token_ids(bundle))
    history: list[dict[str, str]] = []  # the baseline's conversation, as text
    messages: list[Message] = []  # chatkv's conversation, replies with their exact ids
    per_turn: dict[str, list[dict[str, Any]]] = {"generate_loop": [], "chatkv": []}
    with running_engine(bundle, ctx.engine_settings()) as engine:
        warm_ids = render_prompt(bundle.tokenizer, [{"role": "user", "content": WARMUP_MESSAGE}])
        generate_with_cache(bundle, warm_ids, 2)
        run_turn(engine, "bench-multiturn-warmup", [Message("user", WARMUP_MESSAGE)], 2)
        for turn_number, text in enumerate(USER_MESSAGES[:turns], start=1):
            ctx.progress(f"multiturn: turn {turn_number}/{turns}")
            history.append({"role": "user", "content": text})
            prompt_ids = render_prompt(bundle.tokenizer, history)
            generation = generate_with_cache(bundle, prompt_ids, new_tokens)
            reply_text = bundle.tokenizer.decode([t for t in generation.reply_ids if t not in stops], skip_special_tokens=True)
            history.append({"role": "assistant", "content": reply_text})
            per_turn["generate_loop"].append({
                "turn": turn_number, "prompt_tokens": len(prompt_ids), "ttft_ms": generation.ttft_ms,
                "total_ms": generation.total_ms, "new_tokens": generation.new_tokens,
            })

            messages.append(Message("user", text))
            turn, wall_ms = run_turn(engine, "bench-multiturn", messages, new_tokens)
            messages.append(Message("assistant", turn.reply, token_ids=list(turn.reply_ids)))
            per_turn["chatkv"].append({
                "turn": turn_number, "prompt_tokens": turn.prompt_tokens, "reused_tokens": turn.reused_tokens,
                "prefilled_tokens": turn.prefilled_tokens, "ttft_ms": turn.ttft_ms, "total_ms": wall_ms,
                "new_tokens": turn.new_tokens, "same_prompt_as_baseline": list(turn.prompt_ids) == prompt_ids,
            })

    for name, rows in per_turn.items():
        result.figures[name] = _growth(rows)
    last = turns - 1
    chatkv, loop = per_turn["chatkv"], per_turn["generate_loop"]
    result.figures["comparison"] = {
        "last_turn": turns,
        "last_turn_ttft_speedup": ratio(loop[last]["ttft_ms"], chatkv[last]["ttft_ms"]),
        "turns_with_same_prompt": sum(1 for row in chatkv if row["same_prompt_as_baseline"]),
    }
    result.tables.append(_table(per_turn))
    comparison = result.figures["comparison"]
    result.notes.append(
        f"turn {turns}: chatkv answers {times(comparison['last_turn_ttft_speedup'])} sooner than the re-generating loop; "
        f"TTFT grows {fmt(result.figures['generate_loop']['ttft_ms_per_1k_prompt_tokens'])} ms per 1k history tokens "
        f"for the loop and {fmt(result.figures['chatkv']['ttft_ms_per_1k_prompt_tokens'])} ms for chatkv.")
    result.notes.append(
        f"prompts identical on {comparison['turns_with_same_prompt']} of {turns} turns: the loop re-renders replies as text, "
        "so its prompts (and then its replies) may legitimately drift from chatkv's exact ids.")
    return result


def _growth(rows: list[dict[str, Any]]) -> dict[str, Any]:
    prompt_tokens = [row["prompt_tokens"] for row in rows]
    ttfts = [row["ttft_ms"] for row in rows]
    return {
        "per_turn": rows,
        "first_turn_ttft_ms": ttfts[0],
        "last_turn_ttft_ms": ttfts[-1],
        "last_turn_prompt_tokens": prompt_tokens[-1],
        # how TTFT grows with history: least-squares slope over the turns
        "ttft_ms_per_1k_prompt_tokens": 1000 * slope(prompt_tokens, ttfts),
    }


def _table(per_turn: dict[str, list[dict[str, Any]]]) -> Table:
    table = Table("multiturn: TTFT per turn", ["turn", "loop prompt", "loop TTFT (ms)", "chatkv prompt",
                                                "chatkv prefilled", "chatkv TTFT (ms)", "speed-up"])
    for loop_row, chatkv_row in zip(per_turn["generate_loop"], per_turn["chatkv"]):
        table.add(loop_row["turn"], fmt(loop_row["prompt_tokens"]), fmt(loop_row["ttft_ms"]),
                  fmt(chatkv_row["prompt_tokens"]), fmt(chatkv_row["prefilled_tokens"]), fmt(chatkv_row["ttft_ms"]),
                  times(ratio(loop_row["ttft_ms"], chatkv_row["ttft_ms"])))
    return table
