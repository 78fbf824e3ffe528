"""Make the README screenshot: two tabs writing replies at once on the real model, with the stats panel open.

    .venv/bin/python docs/screenshots/make_screenshot.py [--model DIR] [--out docs/screenshots/two-tabs-streaming.svg]

It runs the real App (``make_app``) and engine in a throwaway data folder, headless through Textual's pilot:
each tab has two short exchanges first, so later turns reuse their cached KV, then both tabs get their
next message together and the screenshot is taken while both are still streaming. The numbers in the
panel are whatever this machine measured; the text is SmolLM2's, greedy, so it is the same on every run.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

from textual.pilot import Pilot

from chatkv.config import Settings
from chatkv.paths import Paths
from chatkv.runtime import open_runtime
from chatkv.tui.app import AppOptions, make_app

SIZE = (150, 44)
# Two short exchanges per tab before the screenshot, so the panel shows cache hits from earlier turns.
WARM_UP_TURNS = {
    "kv cache": ["In one sentence: what is a KV cache in a language model?", "And in one sentence: why does it save time?"],
    "batching": ["In one sentence: why does batching help a small language model on a CPU?",
                 "And in one sentence: what does it cost?"],
}
STREAMING_TURNS = {
    "kv cache": "Now write a long essay about it for a new engineer: how it works, why it helps, what it costs.",
    "batching": "Now write a long essay about it: how requests are grouped, why it helps, what it costs.",
}
WARM_UP_REPLY_TOKENS = 48
STREAMING_REPLY_TOKENS = 200
TOKENS_SHOWN_BEFORE_SCREENSHOT = 24
KV_BUDGET_BYTES = 48 * 1024**2  # small enough that the memory bar visibly fills
DEFAULT_OUT = Path(__file__).resolve().parent / "two-tabs-streaming.svg"


async def wait_until(pilot: Pilot, condition, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the screenshot scene did not come about in time")
        await pilot.pause(0.05)


async def stage_and_capture(app, out: Path) -> None:
    async with app.run_test(size=SIZE) as pilot:
        tabs = [await app.open_new_conversation(name) for name in WARM_UP_TURNS]
        for tab in tabs:
            for message in WARM_UP_TURNS[tab.conversation.name]:
                await tab.send(message).wait()

        streaming = dataclasses.replace(app.default_sampling(), max_new_tokens=STREAMING_REPLY_TOKENS)
        streamed = {tab.session_id: 0 for tab in tabs}
        for tab in tabs:
            tab.token_listeners.append(lambda _text, session_id=tab.session_id: streamed.__setitem__(session_id, streamed[session_id] + 1))
            tab.send(STREAMING_TURNS[tab.conversation.name], streaming)
        app.chat_tabs.activate(tabs[0])
        await wait_until(pilot, lambda: min(streamed.values()) >= TOKENS_SHOWN_BEFORE_SCREENSHOT
                         or not all(tab.generating for tab in tabs))
        if not all(tab.generating for tab in tabs):
            ended = [tab.conversation.messages[-1].stats for tab in tabs if not tab.generating]
            raise RuntimeError(f"a reply ended before the screenshot: {ended}; choose prompts with longer answers")
        app.refresh_stats(force=True)
        await pilot.pause()
        out.parent.mkdir(parents=True, exist_ok=True)
        app.save_screenshot(filename=out.name, path=str(out.parent))
        for tab in tabs:
            tab.stop()
        await wait_until(pilot, lambda: not any(tab.generating for tab in tabs))


def say(message: str) -> None:
    print(message, file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder or id (default: chatkv's default model)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    settings = Settings()
    settings.generation.max_new_tokens = WARM_UP_REPLY_TOKENS
    settings.generation.temperature = 0.0  # greedy: the same replies, so the same screenshot, on every run
    settings.ui.stats_panel = "show"
    settings.kv.max_bytes_total = KV_BUDGET_BYTES
    if args.model:
        settings.model.model = args.model
    with tempfile.TemporaryDirectory(prefix="chatkv-screenshot-") as home:
        paths = Paths.resolve(home)
        with open_runtime(settings, paths, progress=say, engine_log=say) as runtime:
            options = AppOptions(restore_tabs=False, remember_layout=False, theme="chatkv-dark")
            app = make_app(settings, runtime.engine, runtime.store, paths.user_themes, options)
            asyncio.run(stage_and_capture(app, args.out))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
