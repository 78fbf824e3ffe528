"""The command line: mistakes a user makes are refused with a message, and those that need no model fail fast.

"Fast" means before torch is imported: each test runs ``chatkv.cli.main`` in a fresh interpreter and
checks which heavy modules it imported on the way to its error.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chatkv.cli import build_parser
from chatkv.lock import DataDirLock
from chatkv.paths import Paths

CHATKV = Path(sys.executable).with_name("chatkv")
# runs the CLI, then reports on stderr whether torch or transformers were imported
RUN_AND_REPORT_IMPORTS = """
import sys
from chatkv.cli import main
code = main(sys.argv[1:])
print("imported:", sorted(name for name in ("torch", "transformers") if name in sys.modules), file=sys.stderr)
sys.exit(code)
"""


def run_cli(*arguments: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUN_AND_REPORT_IMPORTS, *arguments], input=stdin,
                          capture_output=True, timeout=120)


def test_a_missing_script_fails_in_under_a_second_and_a_half_without_importing_torch(tmp_path):
    arguments = ["launch", "--headless", "--script", str(tmp_path / "missing.jsonl"), "--data-dir", str(tmp_path / "home")]
    reported = run_cli(*arguments)
    assert reported.returncode == 2 and "imported: []" in reported.stderr.decode()
    elapsed = []
    for _ in range(3):  # the best of three: a busy machine only ever adds time
        started = time.perf_counter()
        completed = subprocess.run([str(CHATKV), *arguments], capture_output=True, timeout=60)
        elapsed.append(time.perf_counter() - started)
        assert completed.returncode == 2
        assert "cannot read the script" in completed.stderr.decode() and "No such file" in completed.stderr.decode()
    if min(elapsed) >= 1.5 and os.getloadavg()[0] > 2 * (os.cpu_count() or 1):
        pytest.skip(f"took {min(elapsed):.2f} s on a machine with load {os.getloadavg()[0]:.0f}: the limit is for a quiet one")
    assert min(elapsed) < 1.5, f"took {min(elapsed):.2f} s"


def test_a_held_data_folder_is_reported_before_torch_loads(tmp_path):
    home = tmp_path / "home"
    script = tmp_path / "script.jsonl"
    script.write_text('{"op": "quit"}\n')
    with DataDirLock(Paths.resolve(home).data):
        completed = run_cli("launch", "--headless", "--script", str(script), "--data-dir", str(home))
    stderr = completed.stderr.decode()
    assert completed.returncode == 1 and "imported: []" in stderr
    assert "loading" not in stderr  # the model line comes only once the checks have passed


def test_a_missing_gguf_is_reported_before_torch_loads_and_without_a_loading_line(tmp_path):
    script = tmp_path / "script.jsonl"
    script.write_text('{"op": "quit"}\n')
    completed = run_cli("launch", "--headless", "--script", str(script), "--data-dir", str(tmp_path / "home"),
                        "--model", str(tmp_path / "nope.gguf"))
    stderr = completed.stderr.decode()
    assert completed.returncode == 1 and "No such GGUF file" in stderr and "imported: []" in stderr
    assert "loading" not in stderr and "first launch" not in stderr


def test_the_chat_without_a_terminal_says_so_before_torch_loads(tmp_path):
    completed = run_cli("launch", "--data-dir", str(tmp_path / "home"))
    stderr = completed.stderr.decode()
    assert completed.returncode == 2 and "needs a terminal" in stderr and "imported: []" in stderr


@pytest.mark.parametrize("flags", [["--script", "x.jsonl"], ["--stream"], ["--trace"], ["--ephemeral"]])
def test_headless_flags_without_headless_are_an_error(tmp_path, flags):
    completed = run_cli("launch", *flags, "--data-dir", str(tmp_path / "home"))
    stderr = completed.stderr.decode()
    assert completed.returncode == 2
    assert f"{flags[0]} only applies with --headless" in stderr


@pytest.mark.parametrize("arguments", [["launch", "--headles"], ["launch", "--max-kv-byte", "1GiB"],
                                       ["sessions", "list", "--data-di", "x"]])
def test_abbreviated_flags_are_refused(arguments):
    completed = run_cli(*arguments)
    assert completed.returncode == 2 and "unrecognized arguments" in completed.stderr.decode()


def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                for inner_name, inner in _subparsers(sub):
                    yield f"{name} {inner_name}", inner


def test_every_flag_has_help_and_every_valued_flag_says_its_default():
    for command, parser in _subparsers(build_parser()):
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            flag = action.option_strings[-1]
            assert action.help, f"chatkv {command} {flag} has no help"
            takes_value = action.nargs != 0
            if takes_value and not action.required:
                assert "default" in action.help, f"chatkv {command} {flag} does not say its default"
