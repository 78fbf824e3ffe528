"""An error nobody caught ends chatkv with exit status 1, one line naming a log file, and everything saved.

Each crash is real: a child ``chatkv`` (the TUI in a real pseudo-terminal, or headless mode) runs on
SmolLM2 with one function patched to raise, as a bug would. The test then reads what the user would:
the exit status, what reached the terminal, the log file, and the conversations on disk.
"""

from __future__ import annotations

import fcntl
import os
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import orjson
import pytest

from chatkv.crash import crash_summary, write_crash_log
from chatkv.paths import Paths
from chatkv.store import ConversationStore

pytestmark = pytest.mark.real_model

# runs in the child: makes one chosen place raise, then runs the real `chatkv` command
CHILD = """
import sys
from chatkv.cli import main
where = sys.argv[1]
def fail(*args, **kwargs):
    raise RuntimeError("injected fault [/tmp] in " + where)
if where == "toggle_stats":
    from chatkv.tui.app import ChatApp
    ChatApp.action_toggle_stats = fail
elif where == "user_message":
    from chatkv.tui.widgets.chat_view import ChatView
    original = ChatView.show_history
    async def show_history(self, messages, start=0):
        if any("boom" in message.content for message in messages):
            fail()
        return await original(self, messages, start)
    ChatView.show_history = show_history
elif where == "before_app":
    import chatkv.runtime
    chatkv.runtime.ConversationStore = fail
sys.exit(main(sys.argv[2:]))
"""


def child_args(where: str, home: Path, smollm2_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-c", CHILD, where, "launch", "--data-dir", str(home), "--model", str(smollm2_dir),
            "--dtype", "float32", "--max-new-tokens", "4", *extra]


def crash_logs(home: Path) -> list[Path]:
    return sorted((home / "data").glob("crash-*.log"))


class Terminal:
    """A child on a real pseudo-terminal of a given size; ``output`` is everything it wrote to the screen."""

    def __init__(self, args: list[str], columns: int, rows: int) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(columns), "LINES": str(rows)}
        self.process = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
        os.close(slave)
        self.output = b""

    def read_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.05)
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:
                    return
                if not chunk:
                    return
                self.output += chunk

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            self.read_for(0.1)
        self.read_for(0.2)
        if self.process.poll() is None:
            self.process.kill()
            raise AssertionError("the child did not exit")
        return self.process.returncode

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)


def wait_for(condition, timeout: float, terminal: Terminal | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        if terminal is not None:
            terminal.read_for(0.1)
        else:
            time.sleep(0.1)


def saved_conversations(home: Path):
    conversations, set_aside = ConversationStore(Paths.resolve(home)).load_all()
    assert set_aside == []
    return conversations


def test_a_crash_in_the_tui_exits_1_with_one_line_naming_a_log_and_keeps_the_conversation_and_its_kv(tmp_path, smollm2_dir):
    home = tmp_path / "home"
    terminal = Terminal(child_args("toggle_stats", home, smollm2_dir), columns=100, rows=30)
    try:
        terminal.read_for(1)
        # the app is up once it has saved its first (empty) conversation
        wait_for(lambda: len(saved_conversations(home)) == 1 if (home / "data" / "sessions").exists() else False, 120, terminal)
        terminal.read_for(1)
        terminal.type(b"hello")
        terminal.read_for(0.5)
        terminal.type(b"\r")
        wait_for(lambda: [m.role for m in saved_conversations(home)[0].messages][-1:] == ["assistant"], 120, terminal)
        terminal.type(b"\x1bOQ")  # F2, which the child's patch turns into a bug
        code = terminal.wait(60)
    finally:
        terminal.close()
    assert code == 1
    screen = terminal.output.decode("utf-8", "replace")
    assert "Traceback" not in screen and "injected fault" in screen
    logs = crash_logs(home)
    assert len(logs) == 1
    assert f"the full traceback is in {logs[0]}" in screen
    log_text = logs[0].read_text()
    assert "Traceback" in log_text and "RuntimeError: injected fault [/tmp] in toggle_stats" in log_text
    assert oct(logs[0].stat().st_mode & 0o777) == "0o600"
    (conversation,) = saved_conversations(home)
    assert [m.role for m in conversation.messages if m.role != "system"] == ["user", "assistant"]
    assert conversation.messages[-1].token_ids  # the model's own ids, so the next launch reuses the KV
    assert list((home / "cache" / "snapshots").glob(f"{conversation.id}*")), "the KV snapshot was written on the way out"


def test_a_crash_in_headless_mode_is_an_error_event_naming_the_log_and_exits_1(tmp_path, smollm2_dir):
    home = tmp_path / "home"
    script = b"\n".join(orjson.dumps(op) for op in [
        {"op": "open", "tab": "a"}, {"op": "send", "tab": "a", "text": "hello"}, {"op": "wait"},
        {"op": "send", "tab": "a", "text": "boom"}, {"op": "wait"}, {"op": "stats"},
    ]) + b"\n"
    done = subprocess.run(child_args("user_message", home, smollm2_dir, "--headless", "--script", "-"),
                          input=script, capture_output=True, timeout=300)
    assert done.returncode == 1
    events = [orjson.loads(line) for line in done.stdout.splitlines()]
    assert [event["event"] for event in events][0] == "turn"
    crash_events = [event for event in events if event["event"] == "error" and "unexpected error" in event["message"]]
    assert len(crash_events) == 1
    (log,) = crash_logs(home)
    assert str(log) in crash_events[0]["message"]
    assert b"Traceback" not in done.stderr and b"Traceback" not in done.stdout
    (conversation,) = saved_conversations(home)
    assert [m.content for m in conversation.messages if m.role == "user"][0] == "hello"
    assert conversation.messages[[m.content for m in conversation.messages].index("hello") + 1].role == "assistant"


def test_a_crash_outside_the_app_is_one_line_and_a_log_not_a_traceback(tmp_path, smollm2_dir):
    home = tmp_path / "home"
    done = subprocess.run(child_args("before_app", home, smollm2_dir, "--headless", "--script", "-"),
                          input=b"", capture_output=True, timeout=300)
    assert done.returncode == 1
    assert b"Traceback" not in done.stderr
    (log,) = crash_logs(home)
    assert f"the full traceback is in {log}".encode() in done.stderr
    assert "injected fault [/tmp] in before_app" in log.read_text()


def test_the_crash_line_is_one_line_whatever_the_error_says_and_survives_an_unwritable_folder(tmp_path):
    error = ValueError("two\nlines\r\nand a [/tag]" + "x" * 500)
    assert write_crash_log(tmp_path / "file" / "below", error) is not None
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    assert write_crash_log(blocker / "data", error) is None
    for log_path in (None, tmp_path / "crash-1.log"):
        line = crash_summary(error, log_path)
        assert "\n" not in line and "\r" not in line and len(line) < 400
        assert "ValueError" in line
