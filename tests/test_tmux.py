"""The real-terminal check: scripts/tmux_check.sh runs ``chatkv launch`` in tmux, sends a message, reads the reply;
with ``--first-launch``, as on a machine that never ran chatkv."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "tmux_check.sh"

pytestmark = pytest.mark.skipif(
    shutil.which("tmux") is None,
    reason="tmux is not installed (apt-get install tmux); the real-terminal check needs it",
)


def run_check(*args: str, env: dict[str, str] | None = None, timeout: float = 420) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


@pytest.mark.real_model
def test_chat_in_a_real_terminal_shows_the_reply_and_quits_cleanly(smollm2_dir: Path) -> None:
    result = run_check(str(smollm2_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tmux_check: reply on screen:" in result.stdout
    assert "tmux_check: chatkv quit cleanly (status 0)" in result.stdout


@pytest.mark.real_model
def test_a_machines_first_launch_answers_a_message_typed_while_the_model_loads_and_never_shows_red() -> None:
    # Everything that happens once per machine, in a fresh data folder and a fresh kernel build folder: the model
    # package is fetched, converted and quantized, the kernels are built, and their notes reach the running app.
    result = run_check("--first-launch", timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tmux_check: reply on screen:" in result.stdout
    assert "tmux_check: chatkv quit cleanly (status 0)" in result.stdout


def test_check_fails_when_chatkv_exits_before_the_chat_appears(tmp_path: Path) -> None:
    # /bin/false stands in for a chatkv that dies at start: the check must say so, not pass or hang.
    result = run_check(env={"CHATKV": shutil.which("false") or "/bin/false"}, timeout=60)
    assert result.returncode == 1
    assert "chatkv exited (status 1) while waiting for chat screen" in result.stderr
