"""A reply timed the way a user sees it: through the App's token stream, in a chatkv child process.

The child is ``chatkv launch --headless --ephemeral --stream``: the same App, tabs and engine as the
terminal UI, with no terminal. It reads a script that warms up on one tab, then sends each prompt once
per round, each time to a new tab, and prints a ``token`` event per streamed fragment. Each event is
timestamped here as its line arrives; a round's rate is (events - 1) / (last - first), the same
first-to-last definition as the engine's own figure, so the two differ only by what the App adds
(its event loop, Markdown streaming, the socket hop from its engine process).

The child gets a data folder of its own (so it never meets the user's chatkv or its lock) whose model
cache is the bench's, so nothing is fetched, converted or quantized again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TIMEOUT_SECONDS = 600


class AppStreamError(RuntimeError):
    """The child chatkv did not produce a timed reply; the message says what it printed."""


def app_decode_rates(models_dir: Path, prompts: dict[str, str], max_new_tokens: int, rounds: int,
                     options: list[str]) -> dict[str, list[float]]:
    """Token events per second of each round's reply to each prompt (by name) as the App streams it.

    The prompts take turns, round by round, each reply in a new tab; rounds with fewer than 2 token
    events are left out. ``options``: command-line options for the child (``--quant``, ``--threads``,
    ``--draft-tokens``, ``--dtype``, ``--model``). Raises ``AppStreamError`` if the child fails or times out.
    """
    script = [{"op": "open", "tab": "warmup"},
              {"op": "send", "tab": "warmup", "text": "Say hello.", "max_new_tokens": 2, "temperature": 0},
              {"op": "wait"}]
    for round_number in range(rounds):
        for name, prompt in prompts.items():
            tab = f"round-{round_number}-{name}"
            script += [{"op": "open", "tab": tab},
                       {"op": "send", "tab": tab, "text": prompt, "max_new_tokens": max_new_tokens, "temperature": 0},
                       {"op": "wait"}]
    script.append({"op": "quit"})
    with tempfile.TemporaryDirectory(prefix="chatkv-bench-app-") as home:
        cache = Path(home) / "cache"
        cache.mkdir()
        (cache / "models").symlink_to(Path(models_dir).resolve(), target_is_directory=True)
        command = [sys.executable, "-m", "chatkv", "launch", "--headless", "--ephemeral", "--stream", "--script", "-",
                   *options]
        environment = {**os.environ, "CHATKV_HOME": home}
        arrivals: dict[str, list[float]] = {}
        log = Path(home) / "stderr.txt"  # a file, not a pipe nobody reads while the child runs
        with log.open("w") as stderr, subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                       stderr=stderr, text=True, env=environment) as child:
            assert child.stdin is not None and child.stdout is not None
            watchdog = threading.Timer(TIMEOUT_SECONDS, child.kill)  # a silent, hung child ends the read below
            watchdog.start()
            try:
                child.stdin.write("".join(json.dumps(op) + "\n" for op in script))
                child.stdin.close()
                error = _read_events(child.stdout, arrivals)
            finally:
                watchdog.cancel()
            if error is not None:
                child.kill()
                raise AppStreamError(f"chatkv reported an error: {error}")
            if child.wait() != 0:
                raise AppStreamError(f"chatkv exited with status {child.returncode} (killed after "
                                     f"{TIMEOUT_SECONDS} s if negative): {log.read_text().strip()[-500:]}")
    rates: dict[str, list[float]] = {name: [] for name in prompts}
    for tab, times in arrivals.items():
        if len(times) > 1:
            rates[tab.split("-", 2)[2]].append((len(times) - 1) / (times[-1] - times[0]))
    return rates


def _read_events(lines, arrivals: dict[str, list[float]]) -> str | None:
    """Timestamp each round's token events as they arrive; the message of the first error event, if any."""
    for line in lines:
        now = time.perf_counter()
        try:
            event = json.loads(line)
        except ValueError:
            continue  # not an event (a library's stray print)
        if event.get("event") == "token" and str(event.get("tab", "")).startswith("round-"):
            arrivals.setdefault(event["tab"], []).append(now)
        elif event.get("event") == "error":
            return str(event.get("message"))
    return None
