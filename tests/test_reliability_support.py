"""Helpers the reliability tests share (this module holds no tests of its own).

- ``HeadlessChild``: a real ``chatkv launch --headless --script -`` process, fed one script line at a
  time and read one event at a time, so a test can act (kill it, fill its disk) at a chosen moment.
- ``run_script``: the same headless runner in this process, on the tiny model: the real App, the
  real ScriptRunner and the real engine, without paying for a process and the real model.
"""

from __future__ import annotations

import dataclasses
import io
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import orjson

from chatkv.config import Settings
from chatkv.engine import Engine
from chatkv.paths import Paths
from chatkv.store import ConversationStore

CHATKV = Path(sys.executable).with_name("chatkv")
EVENT_TIMEOUT = 120.0


class HeadlessChild:
    """``chatkv launch --headless --script -`` on the real model, driven line by line through stdin.

    ``prelude``: Python run before chatkv starts (fault injection), in chatkv and in its engine process
    alike: it becomes a ``sitecustomize`` module on their ``PYTHONPATH``. A prelude that wants to say
    where it stands writes to ``$CHATKV_TEST_SIGNALS`` (``expect_signal`` reads it): the engine
    process's stderr goes to its log, not here.
    """

    def __init__(self, data_dir: Path, model_dir: Path, *flags: str, prelude: str | None = None,
                 env: dict[str, str] | None = None, umask: int | None = None) -> None:
        arguments = ["launch", "--headless", "--script", "-", "--data-dir", str(data_dir), "--model", str(model_dir),
                     "--dtype", "float32", "--temperature", "0", "--stream", "--trace", *flags]
        child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        child_env.pop("CHATKV_HOME", None)
        self.signals = Path(tempfile.mkdtemp(prefix="chatkv-prelude-")) / "signals.txt"
        if prelude:
            (self.signals.parent / "sitecustomize.py").write_text(prelude)
            child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.signals.parent), child_env.get("PYTHONPATH")]))
            child_env["CHATKV_TEST_SIGNALS"] = str(self.signals)
        # a process group of its own, so kill() takes chatkv's engine process with it
        self.process = subprocess.Popen(
            [str(CHATKV), *arguments], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=child_env, preexec_fn=(lambda: os.umask(umask)) if umask is not None else None, start_new_session=True,
        )
        self.events: list[dict[str, Any]] = []
        self._unclaimed: list[dict[str, Any]] = []  # read, but not yet returned by expect()
        self.stderr_lines: list[str] = []
        self._stdout: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._stderr: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self) -> None:
        for raw in self.process.stdout:
            self._stdout.put(orjson.loads(raw))  # a line that is not JSON fails the test here: the contract
        self._stdout.put(None)

    def _read_stderr(self) -> None:
        for raw in self.process.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.stderr_lines.append(line)
            self._stderr.put(line)
        self._stderr.put(None)

    def send(self, **op: Any) -> None:
        self.process.stdin.write(orjson.dumps(op) + b"\n")
        self.process.stdin.flush()

    def expect(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = EVENT_TIMEOUT) -> dict[str, Any]:
        """The first event not returned before for which ``predicate`` holds (all are kept in ``events``)."""
        for index, event in enumerate(self._unclaimed):
            if predicate(event):
                return self._unclaimed.pop(index)
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = self._stdout.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no matching event in {timeout} s; got {self.events[-5:]}; "
                                     f"stderr {self.stderr_lines[-5:]}") from None
            if event is None:
                self._stdout.put(None)
                raise AssertionError(f"chatkv ended first (rc {self.process.wait()}); events {self.events[-5:]}; "
                                     f"stderr {self.stderr_lines[-5:]}")
            self.events.append(event)
            if predicate(event):
                return event
            self._unclaimed.append(event)

    def discard_unclaimed(self) -> None:
        """From now on expect() only sees events that come after this call."""
        self._unclaimed.clear()

    def turn(self, tab: str, timeout: float = EVENT_TIMEOUT) -> dict[str, Any]:
        """The next turn event of ``tab``; an error event for it fails the test."""
        event = self.expect(lambda e: e.get("tab") == tab and e["event"] in ("turn", "error"), timeout)
        assert event["event"] == "turn", event
        return event

    def expect_stderr(self, text: str, timeout: float = EVENT_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._stderr.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"{text!r} never appeared on stderr: {self.stderr_lines[-5:]}") from None
            if line is None:
                self._stderr.put(None)
                raise AssertionError(f"chatkv ended before saying {text!r}: {self.stderr_lines[-5:]}")
            if text in line:
                return line

    def expect_signal(self, text: str, timeout: float = EVENT_TIMEOUT) -> None:
        """Wait until the prelude (in chatkv or its engine process) has written ``text`` to ``$CHATKV_TEST_SIGNALS``."""
        deadline = time.monotonic() + timeout
        while not (self.signals.exists() and text in self.signals.read_text()):
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} was never signalled; stderr ends {self.stderr_lines[-5:]}")
            if self.process.poll() is not None:
                raise AssertionError(f"chatkv ended before signalling {text!r}: {self.stderr_lines[-5:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        """kill -9 of chatkv and its engine process: no handler, no cleanup, no flush."""
        os.killpg(self.process.pid, signal.SIGKILL)
        assert self.process.wait(timeout=30) == -signal.SIGKILL

    def finish(self, timeout: float = EVENT_TIMEOUT) -> int:
        """Close the script (end of input: chatkv waits for running turns and quits); the exit code."""
        self.process.stdin.close()
        code = self.process.wait(timeout=timeout)
        while (event := self._stdout.get(timeout=30)) is not None:  # what the reader still holds
            self.events.append(event)
        self._stdout.put(None)
        return code

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        shutil.rmtree(self.signals.parent, ignore_errors=True)
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            try:
                stream.close()
            except OSError:
                pass
        # collect what the reader threads saw after the last expect()
        while True:
            try:
                event = self._stdout.get_nowait()
            except queue.Empty:
                break
            if event is not None:
                self.events.append(event)


def run_chatkv(*arguments: str, stdin: bytes = b"", timeout: float = 120) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "CHATKV_HOME"}
    return subprocess.run([str(CHATKV), *arguments], input=stdin, capture_output=True, timeout=timeout, env=env)


def temp_files(folder: Path) -> list[Path]:
    """What chatkv.atomic leaves behind when its writer dies: ``.<name>.<random>.tmp``."""
    return sorted(path for path in folder.iterdir() if path.name.startswith(".") and path.name.endswith(".tmp"))


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


# ---- the headless runner in this process -----------------------------------------------------------


@dataclass
class ScriptRun:
    events: list[dict[str, Any]]
    errors: int
    app: Any
    notifications: list[str] = field(default_factory=list)

    def of(self, kind: str, tab: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == kind and (tab is None or e.get("tab") == tab)]


def script_bytes(*lines: dict[str, Any] | bytes) -> bytes:
    return b"".join((line if isinstance(line, bytes) else orjson.dumps(line)) + b"\n" for line in lines)


async def run_script(engine: Engine, settings: Settings, paths: Paths, script: bytes, *, trace: bool = True,
                     stream: bool = False, persist: bool = True) -> ScriptRun:
    """What ``chatkv launch --headless --script FILE`` does once the model is loaded, in this process."""
    from chatkv.headless import EventWriter, ScriptRunner
    from chatkv.tui.app import AppOptions, make_app

    out = io.StringIO()
    events = EventWriter(out)
    runner = ScriptRunner(io.BytesIO(script), events, stream_tokens=stream, trace=trace)
    options = AppOptions(restore_tabs=False, persist=persist, remember_layout=False)
    if settings.generation.temperature is None:  # replies are checked against the greedy reference
        settings = dataclasses.replace(settings, generation=dataclasses.replace(settings.generation, temperature=0.0))
    app = make_app(settings, engine, ConversationStore(paths), paths.user_themes, options)
    shown: list[str] = []
    original_notify = app.notify

    def notify(message, *args, **kwargs):
        shown.append(str(message))
        return original_notify(message, *args, **kwargs)

    app.notify = notify  # what the user would have seen, had there been a screen
    await app.run_async(headless=True, auto_pilot=runner)
    parsed = [orjson.loads(line) for line in out.getvalue().splitlines()]
    return ScriptRun(parsed, events.errors, app, shown)
