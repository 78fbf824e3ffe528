"""Headless mode (docs/contracts.md, Headless mode): the script parser on its own, then ``chatkv launch --headless`` end to end.

The end-to-end tests run the installed ``chatkv`` command in a subprocess on the real SmolLM2
checkpoint (``--model <folder>`` skips the fetch) with a private ``--data-dir``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from chatkv.headless import STATS_FIELDS
from chatkv.headless_script import ScriptError, parse_line

CHATKV = Path(sys.executable).parent / "chatkv"
TURN_KEYS = {"event", "tab", "turn", "reply", "prompt_tokens", "reused_tokens", "reused_from", "prefilled_tokens",
             "new_tokens", "ttft_ms", "decode_tok_s", "batch_size", "finish_reason"}


# the script language ---------------------------------------------------------------------------

def test_a_send_line_parses_with_its_optional_sampling():
    op = parse_line(b'{"op":"send","tab":"a","text":"hi","max_new_tokens":5,"temperature":0.5}', 1)
    assert (op.name, op.tab, op.text, op.max_new_tokens, op.temperature) == ("send", "a", "hi", 5, 0.5)


def test_blank_lines_are_skipped():
    assert parse_line(b"   ", 3) is None


@pytest.mark.parametrize("raw, complaint", [
    (b"not json", "not valid JSON"),
    (b"[1, 2]", "expected a JSON object"),
    (b'{"op":"fly"}', "unknown op 'fly'"),
    (b'{"tab":"a"}', "unknown op None"),
    (b'{"op":"send","tab":"a"}', 'needs "text"'),
    (b'{"op":"open"}', 'needs "tab"'),
    (b'{"op":"send","tab":"a","text":3}', '"text" must be a string'),
    (b'{"op":"send","tab":"a","text":"x","max_new_tokens":0}', "at least 1"),
    (b'{"op":"send","tab":"a","text":"x","max_new_tokens":true}', "must be an integer"),
    (b'{"op":"send","tab":"a","text":"x","temperature":-1}', "at least 0"),
    (b'{"op":"open","tab":"\xff"}', "not valid UTF-8"),
])
def test_a_bad_line_raises_a_script_error_that_says_what_is_wrong(raw, complaint):
    with pytest.raises(ScriptError) as caught:
        parse_line(raw, 7)
    assert complaint in str(caught.value) and "line 7" in str(caught.value)


def test_a_script_error_names_the_tab_when_the_line_had_one():
    with pytest.raises(ScriptError) as caught:
        parse_line(b'{"op":"send","tab":"b"}', 1)
    assert caught.value.tab == "b"


# end to end ---------------------------------------------------------------------------------------

def run_script(lines: list[str | bytes], data_dir: Path, model_dir: Path, *flags: str) -> tuple[int, list[dict], str]:
    script = b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines)
    completed = subprocess.run(
        [str(CHATKV), "launch", "--headless", "--script", "-", "--data-dir", str(data_dir), "--model", str(model_dir),
         "--dtype", "float32", "--temperature", "0", *flags],
        input=script, capture_output=True, timeout=300,
    )
    events = [json.loads(line) for line in completed.stdout.decode().splitlines()]
    return completed.returncode, events, completed.stderr.decode()


@pytest.mark.real_model
def test_headless_script_runs_two_tabs_reports_bad_lines_and_resumes_a_saved_session(tmp_path, smollm2_dir):
    data_dir = tmp_path / "home"
    code, events, stderr = run_script([
        '{"op":"open","tab":"a","system":"You are terse."}',
        '{"op":"open","tab":"b","name":"Second"}',
        '{"op":"send","tab":"a","text":"What is 2+2?","max_new_tokens":6}',
        '{"op":"send","tab":"b","text":"Name a colour.","max_new_tokens":6}',
        'this is not json',
        '{"op":"dance"}',
        b'\xff\xfe',
        '{"op":"send","tab":"nowhere","text":"hi"}',
        '{"op":"wait"}',
        '{"op":"send","tab":"a","text":"And 3+3?","max_new_tokens":6}',
        '{"op":"wait"}',
        '{"op":"stats"}',
        '{"op":"snapshot"}',
        '{"op":"close","tab":"b"}',
        '{"op":"quit"}',
    ], data_dir, smollm2_dir, "--stream", "--trace")
    assert code == 1, stderr  # errors were reported
    errors = [event for event in events if event["event"] == "error"]
    assert len(errors) == 4
    assert "not valid JSON" in errors[0]["message"] and errors[0]["tab"] is None
    assert "unknown op" in errors[1]["message"]
    assert "UTF-8" in errors[2]["message"]
    assert errors[3]["tab"] == "nowhere"

    turns = [event for event in events if event["event"] == "turn"]
    assert sorted((turn["tab"], turn["turn"]) for turn in turns) == [("a", 1), ("a", 2), ("b", 1)]
    for turn in turns:
        assert TURN_KEYS <= set(turn) and {"prompt_ids", "reply_ids"} <= set(turn)
        assert turn["new_tokens"] == 6 == len(turn["reply_ids"])
        assert turn["prompt_tokens"] == len(turn["prompt_ids"])
        tokens = "".join(event["text"] for event in events if event["event"] == "token" and event["tab"] == turn["tab"])
        assert turn["reply"] in tokens
    second_a = next(turn for turn in turns if turn["tab"] == "a" and turn["turn"] == 2)
    assert second_a["reused_from"] == "memory" and second_a["reused_tokens"] > 0
    [stats] = [event for event in events if event["event"] == "stats"]
    assert set(STATS_FIELDS) <= set(stats) and stats["sessions"] == 2

    # the tabs were saved under their names; opening "a" again resumes it, its KV restored from disk
    assert {path.stem for path in (data_dir / "data" / "sessions").glob("*.json")} == {"a", "b"}
    code, events, stderr = run_script([
        '{"op":"open","tab":"a"}',
        '{"op":"send","tab":"a","text":"And 4+4?","max_new_tokens":4}',
    ], data_dir, smollm2_dir)
    assert code == 0, stderr
    [turn] = events
    assert turn["turn"] == 3 and turn["reused_from"] == "disk" and turn["reused_tokens"] > 0


@pytest.mark.real_model
def test_ephemeral_tabs_are_not_saved(tmp_path, smollm2_dir):
    data_dir = tmp_path / "home"
    code, events, stderr = run_script([
        '{"op":"open","tab":"scratch"}',
        '{"op":"send","tab":"scratch","text":"Hello","max_new_tokens":3}',
        '{"op":"send","tab":"scratch","text":"Again","max_new_tokens":3}',
    ], data_dir, smollm2_dir, "--ephemeral")
    assert code == 0, stderr
    assert [(event["event"], event["turn"]) for event in events] == [("turn", 1), ("turn", 2)]  # sends queue per tab
    assert not list(data_dir.glob("data/sessions/*.json"))


def run_launch(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([str(CHATKV), "launch", *args], input=stdin, capture_output=True, timeout=120)


def test_a_second_chatkv_on_the_same_data_folder_is_told_so_without_a_traceback(tmp_path):
    from chatkv.lock import DataDirLock
    from chatkv.paths import Paths

    data_dir = tmp_path / "home"
    with DataDirLock(Paths.resolve(data_dir).data):
        completed = run_launch("--headless", "--script", "-", "--data-dir", str(data_dir), stdin=b'{"op":"quit"}\n')
    stderr = completed.stderr.decode()
    assert completed.returncode == 1
    assert "is using" in stderr and "--data-dir" in stderr and "Traceback" not in stderr


def test_a_model_that_cannot_be_found_is_explained_without_a_traceback(tmp_path):
    completed = run_launch("--headless", "--script", "-", "--data-dir", str(tmp_path / "home"),
                           "--model", str(tmp_path / "no-such-model"), stdin=b'{"op":"quit"}\n')
    stderr = completed.stderr.decode()
    assert completed.returncode == 1 and "Traceback" not in stderr and "no-such-model" in stderr


def test_the_chat_without_a_terminal_points_to_headless_mode(tmp_path):
    completed = run_launch("--data-dir", str(tmp_path / "home"))
    assert completed.returncode == 2 and "--headless" in completed.stderr.decode()
