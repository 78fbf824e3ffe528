"""The engine in a child process of its own, so the terminal UI never shares an interpreter lock with it.

Why: in one process the UI thread (Textual's layout and Markdown rendering: pure Python) and the
engine thread take turns on the GIL. A decode step makes hundreds of torch calls, each of which gives
the GIL up and must win it back, so every frame the UI draws stalls decoding: one reply streamed about
a fifth slower through the App than from the engine alone. In a child process the engine computes on
its core while the UI draws on another (vLLM keeps its engine core apart from its API server for the
same reason).

``EngineProcess`` offers what the App and headless mode use from ``Engine``: ``submit``, ``cancel``,
``forget``, ``fork_kv``, ``snapshot``, ``stats``, ``session_stats`` and ``close``. The child is
``python -m chatkv.engine.process FD``; the two talk over a socket pair in JSON lines (orjson; nothing
is unpickled), each line ``[kind, key, payload]``:

- app to engine: first ``["start", 0, {settings, paths, models_dir}]``, then ``["call", id, [method, args]]``;
- engine to app: ``["progress", 0, text]`` while the model loads, then ``["ready", 0, {sampling_defaults}]`` or
  ``["failed", 0, message]``; ``["reply", id, {"value": ...} or {"error": [class, message]}]`` for a
  call; ``["token", turn, TokenEvent]`` and ``["result", turn, TurnResult]`` for a submitted turn
  (``turn`` is its submit call's id); ``["log", 0, text]`` for the engine's notes.

The child's own output (warnings, a native crash's last words) goes to ``engine.log`` in the data
folder (new each launch), never to the terminal or to headless mode's event stream. It ignores Ctrl+C,
which the app handles by closing it. If the child ends unexpectedly (killed, out of memory, a crash in
native code), every unfinished turn ends with an error that says so and points at that log, later
calls raise ``EngineError``, and the app stays open for reading. If the app's process goes away, the
child sees the socket close and shuts the engine down.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import traceback
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable

import orjson

from chatkv.config import Settings, apply_mapping
from chatkv.conversation import Message
from chatkv.engine.api import (BackendCapabilities, EngineError, EngineStats, QueueFullError, Sampling, SessionStats,
                               TokenEvent, TurnHandle, TurnResult, check_turn_request)
from chatkv.model.errors import ModelError
from chatkv.paths import Paths, ensure_private_dir

ENGINE_LOG_NAME = "engine.log"
CLOSE_TIMEOUT_S = 60.0  # closing cancels running turns at the next step; a snapshot on the way out can take a while
# calls the child answers on a thread of their own: each waits for the engine thread to reach the end of a step
WAITING_CALLS = ("forget", "fork_kv", "snapshot")
CALLS = ("submit", "cancel", "stats", "session_stats", *WAITING_CALLS)
# what a call's answer is rebuilt as in the app's process (the rest are plain JSON values)
ANSWER_TYPES: dict[str, type] = {"stats": EngineStats, "session_stats": SessionStats}
ERRORS: dict[str, type[Exception]] = {"EngineError": EngineError, "QueueFullError": QueueFullError}

Log = Callable[[str], None]


class Channel:
    """JSON lines over one end of a socket pair: ``send`` from any thread, ``receive`` from one."""

    def __init__(self, sock: socket.socket) -> None:
        self._socket = sock
        self._lines = sock.makefile("rb")
        self._send_lock = threading.Lock()

    def send(self, kind: str, key: int, payload: Any) -> None:
        """Raises ``OSError`` once the other end is gone."""
        line = orjson.dumps([kind, key, payload], default=_plain) + b"\n"
        with self._send_lock:
            self._socket.sendall(line)

    def receive(self) -> tuple[str, int, Any]:
        """The next message; raises ``EOFError`` once the other end is gone."""
        try:
            line = self._lines.readline()
        except OSError:
            line = b""
        if not line:
            raise EOFError
        kind, key, payload = orjson.loads(line)
        return kind, key, payload

    def close(self) -> None:
        self._lines.close()
        self._socket.close()


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} cannot be sent to or from the engine process")


class EngineProcess:
    """``Engine``'s surface for the app, with the engine itself in a child process (see the module docstring)."""

    capabilities = BackendCapabilities()

    def __init__(self, settings: Settings, paths: Paths, models_dir: Path, progress: Log, log: Log,
                 on_death: Log | None = None) -> None:
        """``on_death(message)``: called on the reader thread if the child ends while it should be running (instead
        of logging the message); whoever passes it may start another engine."""
        self._settings = settings
        self._on_death = on_death
        self._paths = paths
        self._models_dir = Path(models_dir)
        self._progress = progress
        self._log = log
        self.log_path = paths.data / ENGINE_LOG_NAME
        self._process: subprocess.Popen | None = None
        self._channel: Channel | None = None
        self._lock = threading.Lock()  # guards the tables below
        self._ids = itertools.count(1)
        self._calls: dict[int, tuple[str, Future]] = {}
        self._turns: dict[int, TurnHandle] = {}
        self._closing = False
        self._aborting = False  # abort() was called: the start is not wanted any more
        self._ended: str | None = None  # why no more calls can be made
        self._reader: threading.Thread | None = None

    # lifecycle ---------------------------------------------------------------------------------
    def start(self) -> "EngineProcess":
        """Start the child and wait until its engine is running, passing its progress on.

        Raises ``ModelError`` with the child's message if the model cannot be loaded, or if the child
        ends before it says so.
        """
        ours, theirs = socket.socketpair()
        ensure_private_dir(self.log_path.parent)
        log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            # a plain subprocess rather than multiprocessing: Textual replaces sys.stderr with an object that has
            # no file descriptor, which multiprocessing's spawn needs; and the child's output must go to the log
            self._process = subprocess.Popen(
                [sys.executable, "-m", "chatkv.engine.process", str(theirs.fileno())], pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )
        finally:
            os.close(log)
            theirs.close()  # the child holds its own copy; when it exits, reads here see the end of the socket
        with self._lock:
            if self._aborting:  # abort() came before there was a child to end
                _end_gently(self._process)
        self._channel = Channel(ours)
        try:
            self._channel.send("start", 0, {"settings": dataclasses.asdict(self._settings),
                                            "paths": dataclasses.asdict(self._paths), "models_dir": self._models_dir})
            while True:
                kind, _, payload = self._channel.receive()
                if kind == "progress":
                    self._progress(payload)
                elif kind == "log":
                    self._log(payload)
                elif kind == "failed":
                    self._ended = payload
                    break
                elif kind == "ready":  # with the model's own sampling defaults, which new tabs start from
                    self._settings.generation.fill_sampling_defaults(payload["sampling_defaults"])
                    break
        except (EOFError, OSError):
            self._wait(5)
            self._ended = f"the model could not be loaded: {self._ended_message()}"
        if self._ended is not None:
            self._wait(CLOSE_TIMEOUT_S)
            self._channel.close()
            raise ModelError(self._ended)
        self._reader = threading.Thread(target=self._read, name="chatkv-engine-socket", daemon=True)
        self._reader.start()
        return self

    def abort(self) -> None:
        """From another thread while ``start`` waits for the model: end the child, so ``start`` raises ``ModelError``
        at once instead of finishing a load nobody wants (the app quit during it)."""
        with self._lock:
            self._aborting = True
            process = self._process
        if process is not None:
            _end_gently(process)

    def close(self) -> None:
        """Close the engine (running turns end as cancelled) and wait for the child to exit."""
        if self._process is None:
            return
        with self._lock:
            self._closing = True
            running = self._ended is None
        if running:
            try:
                self._call("close", timeout=CLOSE_TIMEOUT_S)
            except (EngineError, TimeoutError):
                pass  # it ended on its own meanwhile, or hangs: _wait kills it
        self._wait(CLOSE_TIMEOUT_S)
        if self._reader is not None:
            self._reader.join()
        self._channel.close()
        self._process = None

    @property
    def pid(self) -> int | None:
        """The child's process id (for ``py-spy``, ``top``); None before ``start`` and after ``close``."""
        return self._process.pid if self._process is not None else None

    def _wait(self, timeout: float) -> None:
        """Wait for the child to exit, killing it after ``timeout`` seconds."""
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    # Engine's surface --------------------------------------------------------------------------
    def submit(self, session_id: str, messages: list[Message], sampling: Sampling | None = None) -> TurnHandle:
        """As ``Engine.submit``: the handle streams the child's tokens on the caller's event loop, if any."""
        sampling = check_turn_request(session_id, messages, sampling)
        handle = TurnHandle.for_caller(session_id)
        self._call("submit", session_id, messages, sampling, handle=handle)
        return handle

    async def until_ready(self) -> None:
        """Running from the start: nothing to wait for."""

    def cancel(self, session_id: str) -> bool:
        return self._call("cancel", session_id)

    def forget(self, session_id: str) -> None:
        self._call("forget", session_id)

    def fork_kv(self, parent_session_id: str, child_session_id: str) -> int:
        return self._call("fork_kv", parent_session_id, child_session_id)

    def snapshot(self, session_ids: list[str] | None = None) -> int:
        return self._call("snapshot", session_ids)

    def stats(self) -> EngineStats:
        return self._call("stats")

    def session_stats(self, session_id: str) -> SessionStats | None:
        return self._call("session_stats", session_id)

    # the socket --------------------------------------------------------------------------------
    def _call(self, method: str, *args: Any, handle: TurnHandle | None = None, timeout: float | None = None) -> Any:
        """Ask the child; returns its answer or raises what it raised (``TimeoutError`` after ``timeout`` seconds).

        ``handle`` receives a submitted turn's events.
        """
        future: Future = Future()
        with self._lock:
            if self._ended is not None:
                raise EngineError(self._ended)
            call_id = next(self._ids)
            self._calls[call_id] = (method, future)
            if handle is not None:
                self._turns[call_id] = handle  # before sending: the first token may come back before the reply
        try:
            self._channel.send("call", call_id, [method, args])
        except OSError:
            pass  # the child is gone: the reader fails this call once it sees the socket close
        try:
            return future.result(timeout)
        except BaseException:
            if handle is not None:
                with self._lock:
                    self._turns.pop(call_id, None)
            raise

    def _read(self) -> None:
        """The reader thread: hands every message from the child to the call or turn it belongs to."""
        while True:
            try:
                kind, key, payload = self._channel.receive()
            except EOFError:
                break
            if kind == "token":
                handle = self._turns.get(key)
                if handle is not None:
                    handle._push(TokenEvent(**payload))
            elif kind == "result":
                with self._lock:
                    handle = self._turns.pop(key, None)
                if handle is not None:
                    handle._finish(TurnResult(**payload))
            elif kind == "reply":
                with self._lock:
                    method, future = self._calls.pop(key, (None, None))
                if future is not None:
                    _settle(future, method, payload)
            elif kind == "log":
                self._log(payload)
        self._child_ended()

    def _child_ended(self) -> None:
        self._wait(5)
        with self._lock:
            expected = self._closing
            self._ended = "the engine has shut down" if expected else self._ended_message()
            calls, self._calls = self._calls, {}
            turns, self._turns = self._turns, {}
        for _, future in calls.values():
            future.set_exception(EngineError(self._ended))
        for handle in turns.values():
            handle._finish(_ended_turn(handle, "cancelled" if expected else "error", None if expected else self._ended))
        if not expected:
            (self._on_death or self._log)(self._ended)

    def _ended_message(self) -> str:
        code = self._process.returncode  # set: _wait has seen the child exit (or killed it)
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        return f"the engine process stopped unexpectedly ({how}); its log is {self.log_path}"


def _settle(future: Future, method: str, payload: dict[str, Any]) -> None:
    if "error" in payload:
        name, message = payload["error"]
        future.set_exception(ERRORS.get(name, RuntimeError)(message if name in ERRORS else f"{name}: {message}"))
        return
    value = payload["value"]
    answer_type = ANSWER_TYPES.get(method)
    future.set_result(answer_type(**value) if answer_type is not None and value is not None else value)


def _ended_turn(handle: TurnHandle, reason: str, error: str | None) -> TurnResult:
    """The result of a turn the child can no longer finish: what it streamed so far."""
    tokens = handle.tokens
    return TurnResult(
        session_id=handle.session_id, reply="".join(t.text for t in tokens), reply_ids=[t.token_id for t in tokens],
        prompt_ids=[], prompt_tokens=None, reused_tokens=None, reused_from="none", prefilled_tokens=None,
        new_tokens=len(tokens), ttft_ms=0.0, decode_tok_s=0.0, batch_size=None, finish_reason=reason, error=error,
    )


# the child -----------------------------------------------------------------------------------------
def serve(channel: Channel) -> None:
    """The child's whole life: load the model, start the engine, answer calls until closed or orphaned."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the whole process group; the app closes us

    def send(kind: str, key: int, payload: Any) -> None:
        try:
            channel.send(kind, key, payload)
        except OSError:
            pass  # the app is gone; the main loop sees the socket close and shuts down

    try:
        _, _, start = channel.receive()
    except EOFError:
        return
    settings = Settings()
    apply_mapping(settings, start["settings"])
    paths = Paths(**{name: Path(folder) for name, folder in start["paths"].items()})
    from chatkv.engine.loading import load_engine

    try:
        engine = load_engine(settings, paths, Path(start["models_dir"]), lambda text: send("progress", 0, text),
                             lambda text: send("log", 0, text))
    except ModelError as exc:
        send("failed", 0, str(exc))
        return
    except Exception as exc:  # noqa: BLE001 - the app shows it and stays open for reading old chats
        traceback.print_exc()
        send("failed", 0, f"the model could not be loaded: {type(exc).__name__}: {exc}")
        return
    send("ready", 0, {"sampling_defaults": engine.bundle.sampling_defaults})
    try:
        _answer_calls(channel, engine, send)
    finally:
        engine.close()


def _answer_calls(channel: Channel, engine, send: Callable[[str, int, Any], None]) -> None:
    while True:
        try:
            _, call_id, (method, args) = channel.receive()
        except EOFError:
            return  # the app's process is gone
        if method == "close":
            engine.close()
            send("reply", call_id, {"value": None})
            return
        if method not in CALLS:
            send("reply", call_id, {"error": ["EngineError", f"the engine has no call {method!r}"]})
            continue
        if method == "submit":
            session_id, messages, sampling = args

            def forward(item: TokenEvent | TurnResult, turn: int = call_id) -> None:
                send("token" if isinstance(item, TokenEvent) else "result", turn, item)

            def call(conversation=[Message(**message) for message in messages], sampling=Sampling(**sampling),
                     session_id=session_id, forward=forward) -> None:
                engine.submit(session_id, conversation, sampling, listener=forward)
        else:
            call = (lambda function=getattr(engine, method), args=args: function(*args))
        if method in WAITING_CALLS:
            threading.Thread(target=_answer, args=(call, call_id, send), daemon=True).start()
        else:
            _answer(call, call_id, send)


def _answer(call: Callable[[], Any], call_id: int, send: Callable[[str, int, Any], None]) -> None:
    try:
        value = call()
    except Exception as exc:  # noqa: BLE001 - raised again in the app's process
        if not isinstance(exc, EngineError):
            traceback.print_exc()  # a bug: its traceback goes to the log
        send("reply", call_id, {"error": [type(exc).__name__, str(exc)]})
        return
    send("reply", call_id, {"value": value})


def _end_gently(process: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM, so the child unwinds (a kernel build releases torch's lock file); SIGKILL if it has not ended soon."""
    process.terminate()
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()


def _exit_on_terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds the load: finally blocks (torch's build lock) run


if __name__ == "__main__":  # python -m chatkv.engine.process FD, as EngineProcess.start runs it
    signal.signal(signal.SIGTERM, _exit_on_terminate)
    serve(Channel(socket.socket(fileno=int(sys.argv[1]))))
