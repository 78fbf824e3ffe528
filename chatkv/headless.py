"""``chatkv launch --headless --script FILE|-``: the same App and engine, driven by a JSON Lines script.

The app runs with Textual's headless driver; its autopilot reads the script line by line and calls
the app's own methods (open a tab, send, close, quit), so a script exercises exactly what a user
does. Events go to stdout as JSON Lines, flushed one by one (docs/contracts.md, Headless mode). A bad line becomes an
error event and the script goes on; the exit code is 1 if any error event was written.

Sends to a tab that is still replying wait for that reply (in order, per tab) without holding up
the script: ``send`` returns at once, ``wait`` waits for every turn sent so far.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from typing import IO, Any, BinaryIO, Callable

import orjson
from textual.pilot import Pilot

from chatkv.crash import CRASH_EXIT_CODE, crash_summary
from chatkv.engine.api import EngineError, EngineStats, Sampling, TurnResult
from chatkv.headless_script import Op, ScriptError, parse_line
from chatkv.lock import DataDirLocked
from chatkv.model.errors import ModelError
from chatkv.runtime import open_runtime
from chatkv.session_id import is_valid_session_id
from chatkv.store import SessionNotFound, StoreError
from chatkv.tui.app import AppOptions, ChatApp, make_app
from chatkv.tui.widgets.chat_tab import ChatTab, TurnRefused

STATS_FIELDS = ("sessions", "tokens", "bytes", "peak_bytes", "budget_bytes", "hit_rate", "evictions", "reused_tokens",
                "avg_batch_size", "queue_depth", "decode_tok_s", "prefill_tok_s",
                # prefix sharing (paged KV): reuse split by where it came from, and what sharing saves right now
                "reused_tokens_same_session", "reused_tokens_other_session", "shared_blocks", "shared_bytes_saved",
                # speculative decoding (prompt lookup): guessed tokens verified, accepted, and their ratio
                "drafted_tokens", "accepted_draft_tokens", "draft_acceptance_rate")
LOCAL_ONLY_STATS = ("sessions", "tokens", "bytes", "peak_bytes", "budget_bytes", "evictions", "avg_batch_size",
                    "queue_depth", "prefill_tok_s",
                    "reused_tokens_same_session", "reused_tokens_other_session", "shared_blocks", "shared_bytes_saved",
                    "drafted_tokens", "accepted_draft_tokens", "draft_acceptance_rate")
TURN_FIELDS = ("prompt_tokens", "reused_tokens", "reused_from", "prefilled_tokens", "new_tokens", "ttft_ms",
               "decode_tok_s", "batch_size", "finish_reason", "dropped_messages", "shared_tokens", "shared_from")


def say(message: str) -> None:
    print(f"chatkv: {message}", file=sys.stderr, flush=True)


class EventWriter:
    """One JSON object per line on the real stdout (held before Textual runs), flushed at once."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.errors = 0
        self.tab_names: dict[str, str] = {}  # session id -> the script's name for its tab

    def emit(self, event: dict[str, Any]) -> None:
        self.stream.write(orjson.dumps(event).decode() + "\n")
        self.stream.flush()

    def error(self, tab: str | None, message: str) -> None:
        self.errors += 1
        self.emit({"event": "error", "tab": tab, "message": message})

    def turn(self, tab: str, turn: int, result: TurnResult, trace: bool) -> None:
        event = {"event": "turn", "tab": tab, "turn": turn, "reply": result.reply}
        event.update({field: getattr(result, field) for field in TURN_FIELDS})
        if result.shared_from is not None:  # the session whose KV this turn shared (a fork's parent): the script's name
            event["shared_from"] = self.tab_names.get(result.shared_from, result.shared_from)
        if result.reused_from == "server":
            event["shared_tokens"] = None  # which of its cached tokens a server shared between requests is not reported
        if trace:
            event["prompt_ids"] = list(result.prompt_ids)
            event["reply_ids"] = list(result.reply_ids)
        self.emit(event)

    def stats(self, stats: EngineStats) -> None:
        event = {"event": "stats", **{field: getattr(stats, field) for field in STATS_FIELDS}}
        if stats.server is not None:
            # a remote server: its KV and batching are its own, so the local figures are absent, not zero;
            # the hit rate covers the turns whose cached tokens the server reported, and "server" its /metrics
            event.update({field: None for field in LOCAL_ONLY_STATS})
            if not stats.prompt_tokens:
                event["hit_rate"] = None
            event["server"] = dataclasses.asdict(stats.server)
        self.emit(event)


class ScriptRunner:
    def __init__(self, script: BinaryIO, events: EventWriter, stream_tokens: bool, trace: bool) -> None:
        self.script = script
        self.events = events
        self.stream_tokens = stream_tokens
        self.trace = trace
        self.tabs: dict[str, ChatTab] = {}
        self.turns: dict[str, asyncio.Task] = {}  # the last turn sent to each tab; each waits for the one before
        self.app: ChatApp

    async def __call__(self, pilot: Pilot) -> None:
        """The app's autopilot: run every line, wait for the turns still running, quit."""
        self.app = pilot.app  # type: ignore[assignment]
        self.app.problem_listeners.append(self.report_problem)
        number = 0
        while raw := await asyncio.to_thread(self.script.readline):
            number += 1
            try:
                op = parse_line(raw.rstrip(b"\r\n"), number)
                if op is not None and not await self.run(op):
                    break
            except ScriptError as exc:
                self.events.error(exc.tab, str(exc))
        await self.wait_all()
        await self.app.action_quit()

    def report_problem(self, session_id: str | None, message: str) -> None:
        """What the App would show a user (a save that failed, say) becomes an error event for the script."""
        name = next((name for name, tab in self.tabs.items() if tab.session_id == session_id), session_id)
        self.events.error(name, message)

    async def run(self, op: Op) -> bool:
        """Carry out one op; False once the script asked to quit."""
        if op.name == "open":
            await self.open(op)
        elif op.name == "send":
            self.send(op)
        elif op.name == "regenerate":
            self.regenerate(op)
        elif op.name == "edit":
            self.edit(op)
        elif op.name == "fork":
            await self.fork(op)
        elif op.name == "wait":
            await self.wait_all()
        elif op.name == "stats":
            scrape_now = getattr(self.app.engine, "scrape_now", None)
            if scrape_now is not None:
                await asyncio.to_thread(scrape_now)  # a remote server: the figures as of now, not of the last panel refresh
            self.events.stats(self.app.engine.stats())
        elif op.name == "snapshot":
            await asyncio.to_thread(self.app.engine.snapshot, self.app.persisted_session_ids())
        elif op.name == "close":
            await self.close(op)
        elif op.name == "quit":
            return False
        return True

    async def open(self, op: Op) -> None:
        assert op.tab is not None
        if op.tab in self.tabs:
            raise ScriptError(f"line {op.line}: tab {op.tab!r} is already open", op.tab)
        conversation = self.saved_conversation(op.tab)
        if conversation is None:
            session_id = op.tab if is_valid_session_id(op.tab) else None
            tab = await self.app.open_new_conversation(op.title or op.tab, op.system, session_id=session_id)
        else:
            if op.title is not None:
                conversation.name = op.title
            if op.system is not None:
                conversation.system = op.system
            tab = await self.app.open_conversation(conversation)
        self.listen(op.tab, tab)
        self.tabs[op.tab] = tab
        self.events.tab_names[tab.session_id] = op.tab

    def saved_conversation(self, tab_name: str):
        """The saved session whose id is this tab's name, if there is one: opening it resumes it."""
        if not is_valid_session_id(tab_name):
            return None
        try:
            return self.app.store.get(tab_name)
        except SessionNotFound:
            return None
        except StoreError as exc:
            raise ScriptError(str(exc), tab_name) from None

    def send(self, op: Op) -> None:
        tab = self.open_tab(op)
        assert op.text is not None
        self.queue_turn(op, tab, lambda sampling: tab.send(op.text, sampling))

    def regenerate(self, op: Op) -> None:
        tab = self.open_tab(op)
        self.queue_turn(op, tab, tab.regenerate)

    def edit(self, op: Op) -> None:
        tab = self.open_tab(op)
        assert op.text is not None and op.message is not None
        self.queue_turn(op, tab, lambda sampling: tab.edit(op.message, op.text, sampling))

    def queue_turn(self, op: Op, tab: ChatTab, start: Callable[[Sampling], object]) -> None:
        """Start the turn once the tab's previous one has ended; the script goes on at once."""
        defaults = tab.sampling
        sampling = Sampling(
            max_new_tokens=op.max_new_tokens or defaults.max_new_tokens,
            temperature=defaults.temperature if op.temperature is None else op.temperature,
            top_p=defaults.top_p,
            repetition_penalty=defaults.repetition_penalty,
            max_time_ms=defaults.max_time_ms,
        )
        previous = self.turns.get(op.tab)
        self.turns[op.tab] = asyncio.create_task(self.run_turn(op.tab, tab, start, sampling, previous))

    async def run_turn(self, name: str, tab: ChatTab, start: Callable[[Sampling], object], sampling: Sampling,
                       previous: asyncio.Task | None) -> None:
        if previous is not None:
            await previous
        try:
            start(sampling)
        except TurnRefused as exc:  # a bad message position, say: nothing changed
            self.events.error(name, str(exc))
            return
        outcome = await tab.wait_for_turn()
        if outcome is None:
            self.events.error(name, "the turn was cut off before it finished")
        elif outcome.error is not None:
            self.events.error(name, outcome.error)
        else:
            assert outcome.result is not None
            self.events.turn(name, outcome.turn, outcome.result, self.trace)

    async def fork(self, op: Op) -> None:
        """Open ``new_tab`` holding messages 0..``message`` of ``tab``, once the tab's turns so far have ended."""
        tab = self.open_tab(op)
        assert op.new_tab is not None and op.message is not None
        if op.new_tab in self.tabs:
            raise ScriptError(f"line {op.line}: tab {op.new_tab!r} is already open", op.tab)
        pending = self.turns.get(op.tab)
        if pending is not None:
            await pending
        session_id = op.new_tab if is_valid_session_id(op.new_tab) else None
        try:
            child = await self.app.fork_tab(tab, op.message, session_id=session_id)
        except TurnRefused as exc:
            raise ScriptError(f"line {op.line}: {exc}", op.tab) from None
        self.listen(op.new_tab, child)
        self.tabs[op.new_tab] = child
        self.events.tab_names[child.session_id] = op.new_tab

    def listen(self, name: str, tab: ChatTab) -> None:
        if self.stream_tokens:
            tab.token_listeners.append(lambda text: self.events.emit({"event": "token", "tab": name, "text": text}))

    async def close(self, op: Op) -> None:
        tab = self.open_tab(op)
        pending = self.turns.pop(op.tab, None)
        if pending is not None:
            await pending
        del self.tabs[op.tab]
        await self.app.close_tab(tab)

    def open_tab(self, op: Op) -> ChatTab:
        tab = self.tabs.get(op.tab or "")
        if tab is None:
            raise ScriptError(f"line {op.line}: no open tab {op.tab!r}; open it first with {{\"op\": \"open\", \"tab\": ...}}", op.tab)
        return tab

    async def wait_all(self) -> None:
        pending = list(self.turns.values())
        self.turns.clear()
        if pending:
            await asyncio.gather(*pending)


def open_script(path: str) -> BinaryIO:
    if path == "-":
        return sys.stdin.buffer
    return open(path, "rb")


def run_headless(context) -> int:
    args, settings, paths = context.args, context.settings, context.paths
    if not args.script:
        say("--headless needs --script FILE (or --script - to read standard input)")
        return 2
    try:
        script = open_script(args.script)
    except OSError as exc:
        say(f"cannot read the script {args.script}: {exc.strerror}")
        return 2
    events = EventWriter(sys.stdout)
    runner = ScriptRunner(script, events, stream_tokens=args.stream, trace=args.trace)
    options = AppOptions(restore_tabs=False, persist=not args.ephemeral, remember_layout=False, theme=args.theme)
    try:
        with script, open_runtime(settings, paths, progress=say, engine_log=say) as runtime:
            for note in runtime.notes:
                say(note)
            app = make_app(settings, runtime.engine, runtime.store, paths.user_themes, options)
            app.run(headless=True, auto_pilot=runner)
            if app.crash is not None:
                from chatkv.tui.launch import snapshot_after_crash

                snapshot_after_crash(runtime.engine, app.crash_session_ids)
                summary = crash_summary(app.crash, app.crash_log)
                events.error(None, summary)
                say(summary)
                return CRASH_EXIT_CODE
    except (DataDirLocked, ModelError, EngineError) as exc:  # each carries a message for the user
        say(str(exc))
        return 1
    return 1 if events.errors or app.return_code else 0
