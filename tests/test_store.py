"""ConversationStore on real files: round trips, atomic saves under failure, hostile files, ids, UI state."""

from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path

import orjson
import pytest

from chatkv import atomic
from chatkv.conversation import Conversation, Message
from chatkv.paths import Paths
from chatkv.store import (
    MAX_FILE_BYTES,
    STALE_TEMP_SECONDS,
    ConversationStore,
    SessionNotFound,
    StoreError,
    validate_session_id,
)


@pytest.fixture
def store(data_dir: Path) -> ConversationStore:
    return ConversationStore(Paths.resolve())


def make_conversation(store: ConversationStore, name: str = "Trip plans", turns: int = 1) -> Conversation:
    conversation = store.new_conversation(name=name, system="You are terse.")
    for turn in range(turns):
        conversation.messages.append(Message("user", f"question {turn} — ünïcödé"))
        conversation.messages.append(
            Message("assistant", f"answer {turn}", token_ids=[1, 2, 300 + turn], stats={"ttft_ms": 12.5, "new_tokens": 3})
        )
    return conversation


def write_session_file(store: ConversationStore, name: str, content: bytes) -> Path:
    store.folder.mkdir(parents=True, exist_ok=True)
    path = store.folder / name
    path.write_bytes(content)
    return path


def valid_record(session_id: str) -> dict:
    return {"version": 1, "id": session_id, "name": session_id, "system": "", "created": 1.0, "updated": 2.0,
            "messages": [{"role": "user", "content": "hi"}]}


# -- round trip ------------------------------------------------------------------------------------


def test_saved_conversation_loads_back_identical(store: ConversationStore):
    conversation = make_conversation(store, turns=3)
    store.save(conversation)

    loaded, messages = store.load_all()

    assert messages == []
    assert loaded == [conversation]
    assert store.get(conversation.id) == conversation
    assert loaded[0].messages[1].token_ids == [1, 2, 300]


def test_load_all_lists_most_recently_updated_first(store: ConversationStore):
    older, newer = make_conversation(store, "older"), make_conversation(store, "newer")
    older.updated, newer.updated = 100.0, 200.0
    store.save(older)
    store.save(newer)

    assert [c.name for c in store.load_all()[0]] == ["newer", "older"]


def test_load_all_on_a_fresh_data_dir_is_empty_without_messages(store: ConversationStore):
    assert store.load_all() == ([], [])


def test_new_conversation_is_not_written_until_saved(store: ConversationStore):
    conversation = store.new_conversation()

    assert conversation.name
    validate_session_id(conversation.id)
    assert not store.session_file(conversation.id).exists()


def test_saved_files_are_private_to_the_user(store: ConversationStore):
    conversation = make_conversation(store)
    store.save(conversation)

    assert stat.S_IMODE(store.folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(store.paths.data.stat().st_mode) == 0o700
    assert stat.S_IMODE(store.session_file(conversation.id).stat().st_mode) == 0o600


def test_save_tightens_a_folder_that_was_too_open(store: ConversationStore):
    store.folder.mkdir(parents=True)
    os.chmod(store.folder, 0o755)

    store.save(make_conversation(store))

    assert stat.S_IMODE(store.folder.stat().st_mode) == 0o700


# -- lookups and deletion --------------------------------------------------------------------------


def test_find_matches_exact_id_then_unique_name(store: ConversationStore):
    first, second = make_conversation(store, "Alpha"), make_conversation(store, "Beta")
    store.save(first)
    store.save(second)

    assert store.find(first.id) == first
    assert store.find("Beta") == second
    assert store.find("beta") == second  # case-blind only when no exact name matches


def test_find_refuses_an_ambiguous_name_and_lists_the_ids(store: ConversationStore):
    first, second = make_conversation(store, "Same"), make_conversation(store, "Same")
    store.save(first)
    store.save(second)

    with pytest.raises(StoreError, match="2 conversations are named 'Same'") as caught:
        store.find("Same")
    assert first.id in str(caught.value) and second.id in str(caught.value)


def test_find_unknown_session_says_how_to_list_them(store: ConversationStore):
    with pytest.raises(SessionNotFound, match="chatkv sessions list"):
        store.find("nothing-like-this")


def test_get_unknown_id_raises_session_not_found(store: ConversationStore):
    with pytest.raises(SessionNotFound, match="abc123"):
        store.get("abc123")


def test_delete_removes_the_conversation_and_its_kv_snapshot(store: ConversationStore):
    conversation = make_conversation(store)
    store.save(conversation)
    snapshot = store.paths.snapshots / f"{conversation.id}.safetensors"
    snapshot.parent.mkdir(parents=True)
    snapshot.write_bytes(b"kv")

    store.delete(conversation.id)

    assert not store.session_file(conversation.id).exists()
    assert not snapshot.exists()
    assert store.load_all() == ([], [])


def test_delete_without_a_snapshot_removes_the_conversation(store: ConversationStore):
    conversation = make_conversation(store)
    store.save(conversation)

    store.delete(conversation.id)

    assert not store.session_file(conversation.id).exists()


def test_delete_unknown_id_raises_session_not_found(store: ConversationStore):
    with pytest.raises(SessionNotFound):
        store.delete("missing1")


# -- session ids that would escape the folder ------------------------------------------------------


@pytest.mark.parametrize("bad_id", ["../evil", "a/b", "..", ".", "a\\b", "a\x00b", "", "-leading-dash", "x" * 65, "dot.dot", "/abs"])
def test_unsafe_session_ids_are_refused_everywhere(store: ConversationStore, bad_id: str):
    with pytest.raises(StoreError, match="not a valid session id"):
        store.get(bad_id)
    with pytest.raises(StoreError, match="not a valid session id"):
        store.delete(bad_id)
    with pytest.raises(StoreError, match="not a valid session id"):
        store.save(Conversation(id=bad_id, name="x"))
    assert not (store.paths.data.parent / "evil.json").exists()


def test_longest_allowed_session_id_saves_and_loads(store: ConversationStore):
    conversation = Conversation(id="a" * 64, name="long id")
    store.save(conversation)

    assert store.get("a" * 64) == conversation


# -- atomic saves under failure --------------------------------------------------------------------


def fail_with(code: int):
    def failing(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return failing


def saved_then_changed(store: ConversationStore) -> tuple[Conversation, bytes]:
    conversation = make_conversation(store)
    store.save(conversation)
    before = store.session_file(conversation.id).read_bytes()
    conversation.messages.append(Message("user", "this turn will not reach the disk"))
    return conversation, before


def leftover_temp_files(store: ConversationStore) -> list[str]:
    return [name for name in os.listdir(store.folder) if name.endswith(".tmp")]


def test_failed_rename_keeps_the_previous_file_and_leaves_no_temp_file(store: ConversationStore, monkeypatch):
    conversation, before = saved_then_changed(store)
    monkeypatch.setattr(atomic.os, "replace", fail_with(errno.ENOSPC))

    with pytest.raises(StoreError):
        store.save(conversation)

    assert store.session_file(conversation.id).read_bytes() == before
    assert leftover_temp_files(store) == []


def test_disk_full_during_write_says_disk_is_full_and_previous_copy_is_kept(store: ConversationStore, monkeypatch):
    conversation, before = saved_then_changed(store)
    monkeypatch.setattr(atomic.os, "fsync", fail_with(errno.ENOSPC))

    with pytest.raises(StoreError) as caught:
        store.save(conversation)

    message = str(caught.value)
    assert f"Could not save conversation {conversation.name!r}: disk is full" in message
    assert "Your previous copy is kept." in message
    assert store.session_file(conversation.id).read_bytes() == before
    assert leftover_temp_files(store) == []


@pytest.mark.parametrize(("code", "words"), [
    (errno.EROFS, "the folder is read-only"),
    (errno.EACCES, "permission denied"),
    (errno.EDQUOT, "disk quota exceeded"),
])
def test_save_failures_are_explained_in_words(store: ConversationStore, monkeypatch, code: int, words: str):
    conversation, before = saved_then_changed(store)
    monkeypatch.setattr(atomic.tempfile, "mkstemp", fail_with(code))

    with pytest.raises(StoreError, match=words):
        store.save(conversation)
    assert store.session_file(conversation.id).read_bytes() == before


def test_first_save_failure_says_nothing_was_saved_before(store: ConversationStore, monkeypatch):
    conversation = make_conversation(store)
    monkeypatch.setattr(atomic.os, "replace", fail_with(errno.ENOSPC))

    with pytest.raises(StoreError, match="has not been saved before"):
        store.save(conversation)
    assert not store.session_file(conversation.id).exists()


def test_read_only_folder_refuses_the_save_and_keeps_the_old_file(store: ConversationStore):
    conversation, before = saved_then_changed(store)
    os.chmod(store.folder, 0o500)
    try:
        probe = store.folder / "probe"
        try:
            probe.touch()
        except PermissionError:
            pass
        else:
            probe.unlink()
            pytest.skip("running as root: chmod 0500 does not stop root from writing (the injected EROFS/EACCES tests cover this)")
        with pytest.raises(StoreError, match="permission denied"):
            store.save(conversation)
        assert store.session_file(conversation.id).read_bytes() == before
    finally:
        os.chmod(store.folder, 0o700)


def test_conversation_too_big_for_the_loader_is_not_saved(data_dir: Path):
    store = ConversationStore(Paths.resolve(), max_file_bytes=2048)
    conversation = store.new_conversation("big")
    conversation.messages.append(Message("user", "x" * 4096))

    with pytest.raises(StoreError, match="over the 2.0 KiB limit; start a new conversation. It has not been saved before."):
        store.save(conversation)


def test_saving_a_malformed_conversation_is_a_programming_error(store: ConversationStore):
    conversation = store.new_conversation("bad")
    conversation.messages.append(Message("robot", "beep"))

    with pytest.raises(ValueError, match="role"):
        store.save(conversation)
    assert not store.session_file(conversation.id).exists()


# -- hostile and damaged files ---------------------------------------------------------------------


HOSTILE_FILES = {
    "invalid_json": (b'{"id": "broken", "messages": [', "not valid JSON"),
    "json_list": (b"[1, 2, 3]", "holds a JSON list, not an object"),
    "messages_not_a_list": (orjson.dumps({"id": "broken", "messages": {"role": "user"}}), "messages must be a list"),
    "unknown_role": (orjson.dumps({"id": "broken", "messages": [{"role": "robot", "content": "x"}]}), "role must be one of"),
    "content_not_a_string": (orjson.dumps({"id": "broken", "messages": [{"role": "user", "content": 42}]}), "content must be a string"),
    "token_ids_strings": (
        orjson.dumps({"id": "broken", "messages": [{"role": "assistant", "content": "x", "token_ids": ["1"]}]}),
        "token_ids[0] must be a non-negative integer",
    ),
    "token_ids_not_a_list": (
        orjson.dumps({"id": "broken", "messages": [{"role": "assistant", "content": "x", "token_ids": 7}]}),
        "token_ids must be a list",
    ),
    "missing_id": (orjson.dumps({"messages": []}), "id must be a non-empty string"),
    "not_utf8": (b'{"id": "broken", "name": "\xff\xfe"}', "not UTF-8"),
    "id_escapes_folder": (orjson.dumps(valid_record("../../etc/evil")), "does not match the file name"),
    "newer_format": (orjson.dumps({**valid_record("broken"), "version": 99}), "newer chatkv"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_FILES))
def test_unreadable_file_is_quarantined_and_others_load(store: ConversationStore, case: str):
    good = make_conversation(store, "survivor")
    store.save(good)
    content, reason = HOSTILE_FILES[case]
    write_session_file(store, "broken.json", content)

    loaded, messages = store.load_all()

    assert loaded == [good]
    assert len(messages) == 1
    assert "broken.json" in messages[0] and reason in messages[0]
    assert not (store.folder / "broken.json").exists()
    assert (store.quarantine_folder / "broken.json").read_bytes() == content
    assert stat.S_IMODE(store.quarantine_folder.stat().st_mode) == 0o700


def test_invalid_json_file_is_quarantined_and_others_load(store: ConversationStore):
    # the plainest case, spelled out: a truncated file next to a good one
    good = make_conversation(store)
    store.save(good)
    write_session_file(store, "abc123.json", b'{"id": "abc123", "mess')

    loaded, messages = store.load_all()

    assert loaded == [good]
    assert "abc123.json could not be used: it is not valid JSON" in messages[0]
    assert str(store.quarantine_folder / "abc123.json") in messages[0]


def test_huge_file_is_quarantined_without_being_read(store: ConversationStore):
    good = make_conversation(store)
    store.save(good)
    huge = store.folder / "huge.json"
    with open(huge, "wb") as handle:
        handle.truncate(MAX_FILE_BYTES + 1)  # sparse: instant, and takes no disk

    loaded, messages = store.load_all()

    assert loaded == [good]
    assert "huge.json" in messages[0] and "too large" in messages[0]
    assert (store.quarantine_folder / "huge.json").stat().st_size == MAX_FILE_BYTES + 1


def test_file_named_with_an_invalid_id_is_quarantined(store: ConversationStore):
    write_session_file(store, "..json", orjson.dumps(valid_record("x")))
    write_session_file(store, "has space.json", orjson.dumps(valid_record("has space")))

    loaded, messages = store.load_all()

    assert loaded == []
    assert len(messages) == 2 and all("not a valid session id" in message for message in messages)
    assert sorted(os.listdir(store.quarantine_folder)) == ["..json", "has space.json"]


def test_symlink_posing_as_a_session_is_quarantined_not_followed(store: ConversationStore, tmp_path: Path):
    secret = tmp_path / "secret.json"
    secret.write_bytes(orjson.dumps(valid_record("linked")))
    store.folder.mkdir(parents=True)
    (store.folder / "linked.json").symlink_to(secret)

    loaded, messages = store.load_all()

    assert loaded == []
    assert "symbolic link" in messages[0]
    assert (store.quarantine_folder / "linked.json").is_symlink()
    assert secret.exists()


def test_fifo_posing_as_a_session_is_quarantined_without_hanging(store: ConversationStore):
    store.folder.mkdir(parents=True)
    os.mkfifo(store.folder / "pipe.json")

    loaded, messages = store.load_all()

    assert loaded == []
    assert "not a regular file" in messages[0]


def test_second_broken_copy_of_the_same_file_is_kept_beside_the_first(store: ConversationStore):
    write_session_file(store, "twice.json", b"first")
    store.load_all()
    write_session_file(store, "twice.json", b"second")

    _, messages = store.load_all()

    kept = sorted(path.read_bytes() for path in store.quarantine_folder.iterdir())
    assert kept == [b"first", b"second"]
    assert "twice.json" in messages[0]


def test_get_of_a_broken_file_quarantines_it_and_explains(store: ConversationStore):
    write_session_file(store, "damaged.json", b"\x00\x01")

    with pytest.raises(StoreError, match="damaged.json could not be used"):
        store.get("damaged")
    assert (store.quarantine_folder / "damaged.json").exists()


def test_other_files_in_the_folder_are_left_alone(store: ConversationStore):
    good = make_conversation(store)
    store.save(good)
    notes = write_session_file(store, "notes.txt", b"mine")

    assert store.load_all() == ([good], [])
    assert notes.read_bytes() == b"mine"


def test_stale_temp_file_from_an_interrupted_write_is_removed_and_never_loaded(store: ConversationStore):
    good = make_conversation(store)
    store.save(good)
    # what chatkv.atomic leaves behind if the process dies between write and rename
    leftover = write_session_file(store, f".{good.id}.json.k3j4h5.tmp", orjson.dumps(valid_record("ghost")))
    long_ago = time.time() - STALE_TEMP_SECONDS - 5
    os.utime(leftover, (long_ago, long_ago))

    loaded, messages = store.load_all()

    assert loaded == [good] and messages == []
    assert not leftover.exists()


def test_fresh_temp_file_is_not_loaded_and_left_for_the_writer(store: ConversationStore):
    # a save in progress in the running app while `chatkv sessions list` loads
    in_progress = write_session_file(store, ".abc.json.x1y2.tmp", orjson.dumps(valid_record("abc")))

    assert store.load_all() == ([], [])
    assert in_progress.exists()


# -- UI state --------------------------------------------------------------------------------------


def test_ui_state_round_trips(store: ConversationStore):
    state = {"open_tabs": ["abc", "def"], "active_tab": "def", "theme": "chatkv-light"}
    store.save_state(state)

    assert store.load_state() == state
    assert stat.S_IMODE(store.paths.state_file.stat().st_mode) == 0o600


def test_missing_ui_state_gives_defaults_without_messages(store: ConversationStore):
    messages: list[str] = []

    assert store.load_state(messages) == {"open_tabs": [], "active_tab": None, "theme": None}
    assert messages == []


@pytest.mark.parametrize(("content", "reason"), [
    (b"{not json", "not valid JSON"),
    (b'"just a string"', "not an object"),
    (b'{"open_tabs": "abc"}', "open_tabs must be a list of session ids"),
    (b'{"open_tabs": ["../etc"]}', "open_tabs must be a list of session ids"),
    (b'{"theme": 3}', "theme must be a string"),
])
def test_broken_ui_state_gives_defaults_a_message_and_is_set_aside(store: ConversationStore, content: bytes, reason: str):
    store.paths.state_file.parent.mkdir(parents=True)
    store.paths.state_file.write_bytes(content)
    messages: list[str] = []

    state = store.load_state(messages)

    assert state == {"open_tabs": [], "active_tab": None, "theme": None}
    assert len(messages) == 1 and "state.json" in messages[0] and reason in messages[0]
    assert not store.paths.state_file.exists()
    assert (store.quarantine_folder / "state.json").read_bytes() == content


def test_saving_state_with_wrong_types_is_a_programming_error(store: ConversationStore):
    with pytest.raises(ValueError, match="open_tabs"):
        store.save_state({"open_tabs": "abc"})


def test_state_save_failure_raises_store_error(store: ConversationStore, monkeypatch):
    monkeypatch.setattr(atomic.os, "replace", fail_with(errno.ENOSPC))

    with pytest.raises(StoreError, match="disk is full"):
        store.save_state({"open_tabs": []})
