"""``chatkv sessions ...`` through the real argument parser, on a private CHATKV_HOME."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from chatkv.cli import main
from chatkv.conversation import Conversation, Message
from chatkv.lock import DataDirLock
from chatkv.paths import Paths
from chatkv.store import ConversationStore


@pytest.fixture
def store(data_dir: Path) -> ConversationStore:
    return ConversationStore(Paths.resolve())


def saved(store: ConversationStore, name: str, turns: int = 2, system: str = "Answer in French.") -> Conversation:
    conversation = store.new_conversation(name=name, system=system)
    for turn in range(turns):
        conversation.messages.append(Message("user", f"Question {turn}?"))
        conversation.messages.append(Message("assistant", f"Réponse {turn}.", token_ids=[5, 6, 7]))
    store.save(conversation)
    return conversation


class FakeTerminal(io.StringIO):
    """stdin as a person at a terminal: isatty() is true and input() reads the typed answer."""

    def isatty(self) -> bool:
        return True


# -- list ------------------------------------------------------------------------------------------


def test_list_shows_id_name_turns_and_last_updated(store: ConversationStore, capsys):
    first = saved(store, "Paris trip", turns=3)
    second = saved(store, "Groceries", turns=1)

    assert main(["sessions", "list"]) == 0

    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "NAME", "TURNS", "LAST", "UPDATED"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {first.id, second.id}
    assert "Paris trip" in rows[first.id] and " 3 " in rows[first.id]
    assert "Groceries" in rows[second.id] and " 1 " in rows[second.id]


def test_list_with_no_sessions_says_so(store: ConversationStore, capsys):
    assert main(["sessions", "list"]) == 0

    assert "No saved conversations" in capsys.readouterr().out


def test_list_reports_a_broken_file_and_still_lists_the_rest(store: ConversationStore, capsys):
    good = saved(store, "Fine")
    (store.folder / "oops.json").write_bytes(b"{truncated")

    assert main(["sessions", "list"]) == 0

    captured = capsys.readouterr()
    assert good.id in captured.out
    assert "oops.json could not be used: it is not valid JSON" in captured.err
    assert (store.quarantine_folder / "oops.json").exists()


def test_list_does_not_pass_escape_sequences_from_a_name_to_the_terminal(store: ConversationStore, capsys):
    saved(store, "evil\x1b]0;pwned\x07\x1b[2J name")

    assert main(["sessions", "list"]) == 0

    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "evil" in out


def test_list_lines_up_wide_and_combining_names_in_terminal_cells_and_cuts_between_graphemes(store, capsys):
    from rich.cells import cell_len

    names = ["plain name", "日本語の会話", "café au lait", "emoji 👩‍👩‍👧‍👦 family", "👩‍👩‍👧‍👦" * 30]
    for name in names:
        saved(store, name)

    assert main(["sessions", "list"]) == 0

    lines = capsys.readouterr().out.splitlines()
    turns_column_ends = {cell_len(line[: line.index(" 2 ") + 2]) for line in lines[1:]}
    assert len(turns_column_ends) == 1, lines  # every row's TURNS value ends in the same terminal column
    long_row = next(line for line in lines if "👩" in line and "emoji" not in line)
    kept = long_row.split("  ")[1]
    assert kept.endswith("…") and kept[:-1] == "👩‍👩‍👧‍👦" * (len(kept[:-1]) // len("👩‍👩‍👧‍👦"))  # whole families only


def test_list_and_show_with_an_ascii_stdout_print_what_they_can(store, tmp_path):
    conversation = saved(store, "日本語 🙂 notes")
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}  # CHATKV_HOME is the test's data folder (data_dir)
    for command in (["sessions", "list"], ["sessions", "show", conversation.id]):
        result = subprocess.run([sys.executable, "-c", "import sys; from chatkv.cli import main; sys.exit(main())",
                                 *command], capture_output=True, text=True, encoding="ascii", errors="strict",
                                env=env, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "internal error" not in result.stderr and "notes" in result.stdout


# -- show ------------------------------------------------------------------------------------------


def test_show_prints_system_prompt_and_every_turn(store: ConversationStore, capsys):
    conversation = saved(store, "Paris trip")

    assert main(["sessions", "show", "Paris trip"]) == 0

    out = capsys.readouterr().out
    assert f"Paris trip  ({conversation.id})" in out
    assert "Answer in French." in out
    assert out.index("Question 0?") < out.index("Réponse 0.") < out.index("Question 1?") < out.index("Réponse 1.")


def test_show_unknown_session_says_so_and_exits_1_without_traceback(store: ConversationStore, capsys):
    assert main(["sessions", "show", "nope"]) == 1

    captured = capsys.readouterr()
    assert "No saved conversation with the id or name 'nope'" in captured.err
    assert "Traceback" not in captured.err + captured.out


def test_show_with_an_unsafe_id_is_a_message_not_a_crash(store: ConversationStore, capsys):
    assert main(["sessions", "show", "../../etc/passwd"]) == 1

    assert "No saved conversation" in capsys.readouterr().err


# -- export ----------------------------------------------------------------------------------------


def test_export_markdown_has_title_system_prompt_and_role_headings(store: ConversationStore, capsys):
    conversation = saved(store, "Paris trip", turns=1)

    assert main(["sessions", "export", conversation.id]) == 0

    out = capsys.readouterr().out
    assert out.startswith("# Paris trip\n")
    assert "## System prompt\n\n```text\nAnswer in French.\n```\n" in out
    assert "## You\n\n```text\nQuestion 0?\n```\n" in out
    assert "## Assistant\n\n```markdown\nRéponse 0.\n```\n" in out


def test_export_json_to_a_file_round_trips_the_conversation(store: ConversationStore, tmp_path: Path, capsys):
    conversation = saved(store, "Paris trip")
    target = tmp_path / "out" / "trip.json"
    target.parent.mkdir()

    assert main(["sessions", "export", "Paris trip", "--format", "json", "-o", str(target)]) == 0

    assert Conversation.from_dict(orjson.loads(target.read_bytes())) == conversation
    assert [name for name in os.listdir(target.parent)] == ["trip.json"]  # no temp file left
    assert str(target) in capsys.readouterr().err


def test_export_json_to_stdout_is_the_full_record(store: ConversationStore, capsys):
    conversation = saved(store, "Paris trip")

    assert main(["sessions", "export", "Paris trip", "--format", "json"]) == 0

    assert orjson.loads(capsys.readouterr().out) == conversation.to_dict()


def test_export_into_a_missing_folder_explains_and_exits_1(store: ConversationStore, tmp_path: Path, capsys):
    saved(store, "Paris trip")

    assert main(["sessions", "export", "Paris trip", "-o", str(tmp_path / "no" / "such" / "x.md")]) == 1

    assert "does not exist" in capsys.readouterr().err


def test_export_onto_a_folder_explains_and_exits_1(store: ConversationStore, tmp_path: Path, capsys):
    saved(store, "Paris trip")

    assert main(["sessions", "export", "Paris trip", "-o", str(tmp_path)]) == 1

    assert "is a folder" in capsys.readouterr().err


# -- delete ----------------------------------------------------------------------------------------


def test_delete_with_yes_removes_conversation_and_snapshot(store: ConversationStore, capsys):
    conversation = saved(store, "Paris trip")
    snapshot = store.snapshot_file(conversation.id)
    snapshot.parent.mkdir(parents=True)
    snapshot.write_bytes(b"kv")

    assert main(["sessions", "delete", "Paris trip", "-y"]) == 0

    assert not store.session_file(conversation.id).exists()
    assert not snapshot.exists()
    assert "Deleted 'Paris trip'" in capsys.readouterr().out


def test_delete_without_a_terminal_and_without_yes_refuses(store: ConversationStore, monkeypatch, capsys):
    conversation = saved(store, "Paris trip")
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))

    assert main(["sessions", "delete", conversation.id]) == 1

    assert "Add -y" in capsys.readouterr().err
    assert store.session_file(conversation.id).exists()


def test_delete_on_a_terminal_asks_and_deletes_on_yes(store: ConversationStore, monkeypatch, capsys):
    conversation = saved(store, "Paris trip")
    monkeypatch.setattr(sys, "stdin", FakeTerminal("y\n"))

    assert main(["sessions", "delete", conversation.id]) == 0

    assert "Delete conversation 'Paris trip'" in capsys.readouterr().out
    assert not store.session_file(conversation.id).exists()


@pytest.mark.parametrize("answer", ["\n", "n\n", "nope\n", ""])
def test_delete_on_a_terminal_keeps_the_conversation_unless_the_answer_is_yes(store: ConversationStore, monkeypatch, capsys, answer: str):
    conversation = saved(store, "Paris trip")
    monkeypatch.setattr(sys, "stdin", FakeTerminal(answer))

    assert main(["sessions", "delete", conversation.id]) == 1

    assert "Nothing deleted." in capsys.readouterr().out
    assert store.session_file(conversation.id).exists()


def test_delete_while_chatkv_is_running_is_refused(store: ConversationStore, capsys):
    conversation = saved(store, "Paris trip")

    with DataDirLock(store.paths.data):
        assert main(["sessions", "delete", conversation.id, "-y"]) == 1

    assert f"(pid {os.getpid()}) is using" in capsys.readouterr().err
    assert store.session_file(conversation.id).exists()


def test_delete_unknown_session_exits_1(store: ConversationStore, capsys):
    assert main(["sessions", "delete", "ghost", "-y"]) == 1

    assert "No saved conversation" in capsys.readouterr().err


def test_data_dir_flag_points_at_another_folder(store: ConversationStore, tmp_path: Path, capsys):
    saved(store, "in the env folder")
    other = tmp_path / "other-home"
    ConversationStore(Paths.resolve(other)).save(Conversation(id="elsewhere1", name="elsewhere"))

    assert main(["sessions", "list", "--data-dir", str(other)]) == 0

    out = capsys.readouterr().out
    assert "elsewhere1" in out and "in the env folder" not in out


def test_unexpected_error_is_one_line_not_a_traceback(store: ConversationStore, monkeypatch, capsys):
    def broken_load_all(self):
        raise RuntimeError("boom")
    monkeypatch.setattr(ConversationStore, "load_all", broken_load_all)
    monkeypatch.delenv("CHATKV_DEBUG", raising=False)

    assert main(["sessions", "list"]) == 1

    err = capsys.readouterr().err
    assert "internal error, please report it: RuntimeError: boom" in err
    assert "Traceback" not in err


# -- the installed command -------------------------------------------------------------------------


def installed_chatkv() -> str:
    beside_python = Path(sys.executable).with_name("chatkv")
    found = str(beside_python) if beside_python.exists() else shutil.which("chatkv")
    assert found, "the chatkv console script is not installed (pip install -e .)"
    return found


def test_installed_console_script_lists_sessions(store: ConversationStore):
    conversation = saved(store, "From the shell")

    result = subprocess.run([installed_chatkv(), "sessions", "list"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "CHATKV_HOME": str(store.paths.data.parent)})

    assert result.returncode == 0, result.stderr
    assert conversation.id in result.stdout and "From the shell" in result.stdout
    assert result.stderr == ""


def test_sessions_commands_do_not_import_torch(store: ConversationStore):
    # the model stack takes seconds to import; listing conversations must not pay for it
    conversation = saved(store, "Light")
    code = (
        "import sys; from chatkv.cli import main; "
        f"codes = [main(['sessions', 'list']), main(['sessions', 'show', '{conversation.id}']), "
        f"main(['sessions', 'export', '{conversation.id}'])]; "
        "assert codes == [0, 0, 0], codes; "
        "heavy = sorted(m for m in ('torch', 'transformers', 'textual') if m in sys.modules); "
        "assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "CHATKV_HOME": str(store.paths.data.parent)})

    assert result.returncode == 0, result.stderr


# -- id prefixes, stopped replies, line breaks (issue 14) -----------------------------------------------------


def with_id(store: ConversationStore, session_id: str, name: str) -> Conversation:
    conversation = store.new_conversation(name=name, system="")
    conversation.id = session_id
    conversation.messages += [Message("user", "Hi?"), Message("assistant", "Hello.", token_ids=[1])]
    store.save(conversation)
    return conversation


def test_show_export_and_delete_take_a_unique_start_of_an_id(store: ConversationStore, capsys):
    with_id(store, "abcd1234ef56", "first")
    with_id(store, "abcd9999ef56", "second")

    assert main(["sessions", "show", "abcd12"]) == 0
    assert "first  (abcd1234ef56)" in capsys.readouterr().out
    assert main(["sessions", "export", "abcd99"]) == 0
    assert capsys.readouterr().out.startswith("# second\n")
    assert main(["sessions", "delete", "-y", "abcd12"]) == 0
    assert [conversation.id for conversation in store.load_all()[0]] == ["abcd9999ef56"]


def test_an_ambiguous_or_too_short_start_of_an_id_is_refused_with_the_candidates(store: ConversationStore, capsys):
    with_id(store, "abcd1234ef56", "first")
    with_id(store, "abcd9999ef56", "second")

    assert main(["sessions", "show", "abcd"]) == 1
    err = capsys.readouterr().err
    assert "2 conversations have ids starting with 'abcd'" in err and "abcd1234ef56" in err and "abcd9999ef56" in err
    assert main(["sessions", "show", "abc"]) == 1  # shorter than four characters: not taken as a prefix
    assert "No saved conversation" in capsys.readouterr().err


def test_show_and_export_mark_replies_that_were_stopped(store: ConversationStore, capsys):
    conversation = store.new_conversation(name="cut short", system="")
    conversation.messages += [
        Message("user", "Tell me a story."),
        Message("assistant", "Once upon", token_ids=[1, 2], stats={"finish_reason": "cancelled"}),
        Message("user", "Another."),
        Message("assistant", "A long one", token_ids=[3], stats={"finish_reason": "length"}),
        Message("user", "Short."),
        Message("assistant", "Done.", token_ids=[4], stats={"finish_reason": "stop"}),
    ]
    store.save(conversation)

    assert main(["sessions", "show", conversation.id]) == 0
    out = capsys.readouterr().out
    assert "--- Assistant (stopped by the user) ---\nOnce upon" in out
    assert "--- Assistant (stopped at the token limit) ---\nA long one" in out
    assert "--- Assistant ---\nDone." in out
    assert main(["sessions", "export", conversation.id]) == 0
    out = capsys.readouterr().out
    assert "## Assistant (stopped by the user)\n" in out and "## Assistant\n\n```markdown\nDone.\n```" in out


def test_markdown_export_keeps_single_line_breaks(store: ConversationStore, capsys):
    from markdown_it import MarkdownIt

    conversation = store.new_conversation(name="poem", system="")
    reply = "Roses are red,\nviolets are blue."
    conversation.messages += [Message("user", "A poem"), Message("assistant", reply, token_ids=[1])]
    store.save(conversation)

    assert main(["sessions", "export", conversation.id]) == 0
    html = MarkdownIt("commonmark").render(capsys.readouterr().out)
    assert "Roses are red,\nviolets are blue." in html and "red, violets" not in html
