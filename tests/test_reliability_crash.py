"""kill -9 at the worst moments, and a second chatkv on the same folder: nothing is lost, nothing needs repair.

Each crash runs in a real child process that is SIGKILLed: no exception handler, no ``finally``, no
flush runs. Moments that are too short to hit by timing (inside a save or a snapshot write) are made
long by a patch in the child that blocks there and says so on stderr; the test then kills it.
After each kill the folder is read back the way the next launch reads it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from chatkv.conversation import Message
from chatkv.engine.engine import eos_token_ids
from chatkv.engine.reference import greedy_full_recompute
from chatkv.engine.snapshot import SnapshotStore
from chatkv.lock import DataDirLock
from chatkv.model.loader import Fingerprint
from chatkv.paths import Paths
from chatkv.store import STALE_TEMP_SECONDS, ConversationStore
from test_reliability_support import HeadlessChild, age, run_chatkv, temp_files

QUESTION_A1 = "Name a fruit."
QUESTION_B1 = "Name a colour."
QUESTION_A2 = "Write a long story about a lighthouse keeper."
QUESTION_A3 = "Thanks. One word: is the sky blue?"


def read_back(home: Path) -> tuple[dict[str, object], list[str]]:
    """What the next launch sees: every conversation by id, and the messages about files set aside."""
    conversations, messages = ConversationStore(Paths.resolve(home)).load_all()
    return {conversation.id: conversation for conversation in conversations}, messages


def assert_turn_kept(messages: list[Message], question: str, turn_event: dict) -> None:
    user, reply = messages
    assert (user.role, user.content) == ("user", question)
    assert (reply.role, reply.content, reply.token_ids) == ("assistant", turn_event["reply"], turn_event["reply_ids"])


def kv_token_ids(turn_event: dict) -> list[int]:
    """The tokens a session's KV holds after a turn: its prompt and reply, less the last sampled token (never fed)."""
    return turn_event["prompt_ids"] + turn_event["reply_ids"][:-1]


def folder_contents(home: Path) -> dict[str, bytes]:
    return {str(path.relative_to(home)): path.read_bytes() for path in sorted(home.rglob("*")) if path.is_file()}


# ---- one story, three kills: during a turn, inside a reply save, inside a snapshot write ------------
#
# Each launch restarts on what the previous kill left, so every restart is also checked: it must resume
# the conversation (and its KV from disk) with nothing repaired by hand.

# In chatkv and its engine process: block inside os.replace for one chosen file until killed. CHATKV_TEST_BLOCK is
# "<file name>:<when>": "replies=N" blocks the write of a conversation holding N replies,
# "again" blocks a write that replaces an existing file.
BLOCK_PRELUDE = textwrap.dedent("""
    import os, sys, threading
    import orjson
    _name, _when = os.environ["CHATKV_TEST_BLOCK"].split(":")
    _real_replace = os.replace

    def _chosen(src, dst):
        if os.path.basename(os.fspath(dst)) != _name:
            return False
        if _when == "again":
            return os.path.exists(dst)
        replies = sum(m["role"] == "assistant" for m in orjson.loads(open(src, "rb").read())["messages"])
        return replies >= int(_when.removeprefix("replies="))

    def _replace(src, dst, *args, **kwargs):
        if _chosen(src, dst):
            with open(os.environ["CHATKV_TEST_SIGNALS"], "a") as signals:
                signals.write("chatkv-test: blocked\\n")
            threading.Event().wait()
        return _real_replace(src, dst, *args, **kwargs)

    os.replace = _replace
""")

QUESTION_A4 = "And is grass green?"
QUESTION_A5 = "Last one: is snow white?"


@pytest.fixture(scope="module")
def crash_story(tmp_path_factory, smollm2_dir: Path):
    home = tmp_path_factory.mktemp("crash-story")
    paths = Paths.resolve(home)
    story: dict = {"home": home, "paths": paths}

    # launch 1: two tabs with a finished turn each and a snapshot; a second chatkv tries the folder;
    # then tab a's second turn is killed after three streamed tokens
    child = HeadlessChild(home, smollm2_dir)
    try:
        child.send(op="open", tab="a")
        child.send(op="open", tab="b")
        child.send(op="send", tab="a", text=QUESTION_A1, max_new_tokens=6)
        child.send(op="send", tab="b", text=QUESTION_B1, max_new_tokens=6)
        story["a1"], story["b1"] = child.turn("a"), child.turn("b")
        child.send(op="snapshot")
        child.send(op="stats")  # ops run in order: once stats is out, the snapshot is on disk
        child.expect(lambda e: e["event"] == "stats")
        story["before_second"] = folder_contents(home)
        story["second"] = run_chatkv("launch", "--headless", "--script", "-", "--data-dir", str(home),
                                     "--model", str(smollm2_dir),
                                     stdin=b'{"op":"open","tab":"a"}\n{"op":"send","tab":"a","text":"mine now"}\n')
        story["after_second"] = folder_contents(home)
        child.discard_unclaimed()  # the first turns' token events
        child.send(op="send", tab="a", text=QUESTION_A2, max_new_tokens=400)
        for _ in range(3):
            child.expect(lambda e: e["event"] == "token" and e["tab"] == "a")
        child.kill()
    finally:
        child.close()
    story["events_1"] = child.events
    story["after_turn_kill"] = read_back(home)
    story["temp_files_after_turn_kill"] = temp_files(paths.sessions) + temp_files(paths.snapshots)

    # launch 2: resume tab a; one turn; the save of the next reply is killed before its rename
    child = HeadlessChild(home, smollm2_dir, prelude=BLOCK_PRELUDE, env={"CHATKV_TEST_BLOCK": "a.json:replies=3"})
    try:
        child.send(op="open", tab="a")
        child.send(op="send", tab="a", text=QUESTION_A3, max_new_tokens=6)
        story["a3"] = child.turn("a")
        child.send(op="send", tab="a", text=QUESTION_A4, max_new_tokens=6)
        child.expect_signal("chatkv-test: blocked")
        child.kill()
    finally:
        child.close()
    story["events_2"] = child.events
    story["after_save_kill"] = read_back(home)
    story["temp_files_after_save_kill"] = temp_files(paths.sessions)

    # launch 3: resume again; one turn; the snapshot written on request is killed before its rename
    child = HeadlessChild(home, smollm2_dir, prelude=BLOCK_PRELUDE, env={"CHATKV_TEST_BLOCK": "a.safetensors:again"})
    try:
        child.send(op="open", tab="a")
        child.send(op="send", tab="a", text=QUESTION_A5, max_new_tokens=6)
        story["a5"] = child.turn("a")
        child.send(op="snapshot")
        child.expect_signal("chatkv-test: blocked")
        child.kill()
    finally:
        child.close()
    story["events_3"] = child.events
    return story


@pytest.mark.real_model
def test_kill_9_during_a_turn_keeps_every_conversation_up_to_its_last_completed_turn(crash_story):
    assert not [e for e in crash_story["events_1"] if e["event"] == "turn" and e["turn"] == 2], "killed too late"
    conversations, set_aside = crash_story["after_turn_kill"]

    assert set_aside == []
    assert sorted(conversations) == ["a", "b"]
    a, b = conversations["a"].messages, conversations["b"].messages
    assert_turn_kept(a[:2], QUESTION_A1, crash_story["a1"])
    assert_turn_kept(b, QUESTION_B1, crash_story["b1"])
    # the unanswered message is kept (the user's words are not lost) and nothing of the cut reply is
    assert [(m.role, m.content) for m in a[2:]] == [("user", QUESTION_A2)]
    assert crash_story["temp_files_after_turn_kill"] == []


@pytest.mark.real_model
def test_second_chatkv_on_the_same_folder_is_told_who_holds_it_and_changes_nothing(crash_story):
    second = crash_story["second"]
    stderr = second.stderr.decode()

    assert second.returncode == 1
    assert "Another chatkv (pid " in stderr and "is using" in stderr and "--data-dir" in stderr
    assert "Traceback" not in stderr
    assert second.stdout == b""  # it never ran the script
    assert crash_story["after_second"] == crash_story["before_second"]


@pytest.mark.real_model
def test_relaunch_after_kill_9_resumes_the_conversation_and_its_kv_from_disk_exactly(crash_story, real_bundle):
    turn = crash_story["a3"]

    assert not [e for e in crash_story["events_2"] if e["event"] == "error"]
    assert turn["turn"] == 3  # the killed turn's message counts: it is in the conversation
    prompt = real_bundle.tokenizer.decode(turn["prompt_ids"])
    assert all(text in prompt for text in (QUESTION_A1, crash_story["a1"]["reply"], QUESTION_A2, QUESTION_A3))
    # the snapshot written before the kill is used, and the reply is the one a full recompute gives
    assert turn["reused_from"] == "disk"
    assert turn["reused_tokens"] == len(kv_token_ids(crash_story["a1"]))
    assert turn["reply_ids"] == greedy_full_recompute(real_bundle.model, turn["prompt_ids"], 6, eos_token_ids(real_bundle))


@pytest.mark.real_model
def test_kill_9_inside_the_save_of_a_reply_keeps_the_previous_copy_and_never_loads_the_temp_file(crash_story):
    conversations, set_aside = crash_story["after_save_kill"]

    assert set_aside == []
    messages = conversations["a"].messages
    assert_turn_kept(messages[3:5], QUESTION_A3, crash_story["a3"])
    assert [(m.role, m.content) for m in messages[5:]] == [("user", QUESTION_A4)]  # the last good copy
    leftover = crash_story["temp_files_after_save_kill"]
    assert len(leftover) == 1 and leftover[0].name.startswith(".a.json.")


@pytest.mark.real_model
def test_relaunch_after_kill_9_inside_a_save_carries_on_and_clears_the_leftover_temp_file(crash_story, real_bundle):
    paths = crash_story["paths"]
    turn = crash_story["a5"]

    assert turn["turn"] == 5
    assert turn["reused_from"] == "disk"  # the snapshot of launch 1 still covers the start of the chat
    assert turn["reply_ids"] == greedy_full_recompute(real_bundle.model, turn["prompt_ids"], 6, eos_token_ids(real_bundle))
    # the leftover of launch 2 is not loaded; once its writer is surely dead, a load removes it
    for path in temp_files(paths.sessions):
        age(path, STALE_TEMP_SECONDS + 1)
    conversations, set_aside = read_back(crash_story["home"])
    assert set_aside == [] and temp_files(paths.sessions) == []
    assert_turn_kept(conversations["a"].messages[6:], QUESTION_A5, turn)


@pytest.mark.real_model
def test_kill_9_inside_a_snapshot_write_keeps_the_previous_snapshot_usable(crash_story, real_bundle):
    paths = crash_story["paths"]
    leftover = temp_files(paths.snapshots)
    assert len(leftover) == 1 and leftover[0].name.startswith(".a.safetensors.")

    snapshots = SnapshotStore(paths.snapshots, real_bundle.fingerprint, 2**30)
    config = real_bundle.model.config
    snapshot = snapshots.load("a", (config.num_hidden_layers, config.num_key_value_heads, config.head_dim), torch.float32)
    assert snapshot is not None, snapshots.last_error("a")
    assert snapshot.token_ids == kv_token_ids(crash_story["a1"])  # the previous, complete snapshot
    finished = sum(path.stat().st_size for path in paths.snapshots.glob("*.safetensors"))  # a's and b's
    assert snapshots.disk_bytes() == finished  # the leftover is not counted
    with DataDirLock(paths.data):  # the kernel dropped the dead process's lock: no stale lock to clear
        pass


# ---- kill -9 inside a save, store and snapshot store alone ----------------------------------------

# A child that saves version 1 normally, then blocks inside the save of version 2 at a chosen point.
# "mid_write" leaves a temp file holding half the bytes.
STORE_WRITER = textwrap.dedent("""
    import os, sys, threading
    import chatkv.atomic as atomic

    point, home, kind = sys.argv[1], sys.argv[2], sys.argv[3]

    def block():
        print("blocked", flush=True)
        threading.Event().wait()

    if kind == "conversation":
        from chatkv.conversation import Message
        from chatkv.paths import Paths
        from chatkv.store import ConversationStore
        store = ConversationStore(Paths.resolve(home))
        item = store.new_conversation("victim")
        item.id = "victim"
        item.messages += [Message("user", "first question"), Message("assistant", "first answer", token_ids=[1, 2, 3])]
        store.save(item)
        item.messages += [Message("user", "second question"), Message("assistant", "second answer", token_ids=[4, 5])]
        save_again = lambda: store.save(item)
    else:
        import torch
        from chatkv.engine.snapshot import SnapshotStore
        from chatkv.model.loader import Fingerprint
        store = SnapshotStore(os.path.join(home, "snapshots"), Fingerprint("m", "h", "float32"), 2**30)
        torch.manual_seed(0)
        kv = torch.randn(2, 2, 2, 5, 4)
        store.save("victim", kv[:, :, :, :3], [1, 2, 3])
        save_again = lambda: store.save("victim", kv, [1, 2, 3, 4, 5])

    real_replace, real_fdopen = os.replace, os.fdopen

    class HalfWriter:
        def __init__(self, handle):
            self.handle = handle
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return False
        def write(self, data):
            self.handle.write(data[: len(data) // 2])
            self.handle.flush()
            block()

    def replace(src, dst):
        if point == "before_rename":
            block()
        real_replace(src, dst)
        block()

    if point == "mid_write":
        atomic.os.fdopen = lambda fd, mode: HalfWriter(real_fdopen(fd, mode))
    else:
        atomic.os.replace = replace
    save_again()
    print("not blocked", flush=True)
""")


def kill_writer_inside_save(point: str, home: Path, kind: str) -> None:
    process = subprocess.Popen([sys.executable, "-c", STORE_WRITER, point, str(home), kind],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "blocked"
    finally:
        process.kill()
        process.wait(timeout=30)
        process.stdout.close()


@pytest.mark.parametrize(("point", "version"), [("mid_write", 1), ("before_rename", 1), ("after_rename", 2)])
def test_kill_9_inside_a_conversation_save_leaves_one_whole_version_and_no_file_to_repair(
        tmp_path: Path, point: str, version: int):
    kill_writer_inside_save(point, tmp_path, "conversation")
    store = ConversationStore(Paths.resolve(tmp_path))

    conversations, set_aside = store.load_all()
    assert set_aside == [] and [c.id for c in conversations] == ["victim"]
    assert [m.content for m in conversations[0].messages if m.role == "user"] == [
        "first question", "second question"][:version]
    leftover = temp_files(store.folder)
    if point == "after_rename":
        assert leftover == []
    else:
        assert len(leftover) == 1
        age(leftover[0], STALE_TEMP_SECONDS + 1)
        assert store.load_all() == (conversations, [])
        assert temp_files(store.folder) == []


# before the rename: the app-level test above (the leftover is the full new file there)
@pytest.mark.parametrize(("point", "tokens"), [("mid_write", [1, 2, 3]), ("after_rename", [1, 2, 3, 4, 5])])
def test_kill_9_inside_a_snapshot_write_leaves_one_whole_snapshot_and_the_leftover_is_cleared_later(
        tmp_path: Path, point: str, tokens: list[int]):
    kill_writer_inside_save(point, tmp_path, "snapshot")
    folder = tmp_path / "snapshots"
    store = SnapshotStore(folder, Fingerprint("m", "h", "float32"), 2**30)

    snapshot = store.load("victim", (2, 2, 4), torch.float32)
    assert snapshot is not None, store.last_error("victim")
    torch.manual_seed(0)
    assert snapshot.token_ids == tokens
    assert torch.equal(snapshot.kv, torch.randn(2, 2, 2, 5, 4)[:, :, :, : len(tokens)])
    leftover = temp_files(folder)
    assert len(leftover) == (0 if point == "after_rename" else 1)
    for path in leftover:
        age(path, 3601)  # the snapshot store's own, longer, staleness rule
        SnapshotStore(folder, Fingerprint("m", "h", "float32"), 2**30)
        assert not path.exists()
