"""Issue 4's promise end to end: quit after several turns, start a new process, and the next turn is
restored from the KV snapshot written on quit: all of the previous conversation reused, from disk, and
the reply token-identical to a full recompute (fp32, greedy)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from chatkv.engine.engine import eos_token_ids
from chatkv.engine.reference import greedy_full_recompute

CHATKV = Path(sys.executable).with_name("chatkv")


def headless(lines: list[dict], data_dir: Path, model_dir: Path) -> list[dict]:
    script = "".join(json.dumps(line) + "\n" for line in lines).encode()
    completed = subprocess.run(
        [str(CHATKV), "launch", "--headless", "--script", "-", "--data-dir", str(data_dir), "--model", str(model_dir),
         "--dtype", "float32", "--temperature", "0", "--trace"],
        input=script, capture_output=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr.decode()
    return [json.loads(line) for line in completed.stdout.decode().splitlines()]


@pytest.mark.real_model
def test_a_reopened_chat_resumes_from_its_snapshot_with_the_whole_history_reused_and_an_exact_reply(
        tmp_path: Path, smollm2_dir: Path, real_bundle):
    data_dir = tmp_path / "home"
    first = headless([
        {"op": "open", "tab": "chat", "system": "You answer in one short sentence."},
        {"op": "send", "tab": "chat", "text": "Name a large animal.", "max_new_tokens": 12},
        {"op": "wait"},
        {"op": "send", "tab": "chat", "text": "Where does it live?", "max_new_tokens": 12},
        {"op": "wait"},
        {"op": "send", "tab": "chat", "text": "What does it eat?", "max_new_tokens": 12},
        {"op": "quit"},  # the snapshot is written on the way out, not by a snapshot op
    ], data_dir, smollm2_dir)
    last = [event for event in first if event["event"] == "turn"][-1]
    assert last["turn"] == 3
    assert (data_dir / "cache" / "snapshots" / "chat.safetensors").is_file()

    [resumed] = headless([
        {"op": "open", "tab": "chat"},
        {"op": "send", "tab": "chat", "text": "Is it endangered?", "max_new_tokens": 12},
    ], data_dir, smollm2_dir)

    assert resumed["event"] == "turn" and resumed["turn"] == 4
    assert resumed["reused_from"] == "disk"
    # everything the model saw before: the last prompt and the reply, but for the reply's final token,
    # which is sampled and never fed back (it is the first token this turn prefills)
    history = last["prompt_ids"] + last["reply_ids"]
    assert resumed["prompt_ids"][: len(history)] == history
    assert resumed["reused_tokens"] == len(history) - 1
    assert resumed["prefilled_tokens"] == resumed["prompt_tokens"] - resumed["reused_tokens"]
    expected = greedy_full_recompute(real_bundle.model, resumed["prompt_ids"], 12, eos_token_ids(real_bundle))
    assert resumed["reply_ids"] == expected
