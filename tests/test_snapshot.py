"""KV snapshots: exact round trips, a refusal with one clear line for every kind of damage, atomic writes,
the LRU disk budget, private files and hostile session ids. Small random tensors, real files, no model."""

from __future__ import annotations

import base64
import json
import os
import pathlib
import pickle
import random
import stat
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from chatkv.engine.snapshot import FORMAT_NAME, Snapshot, SnapshotError, SnapshotStore, matches_prompt
from chatkv.model.loader import Fingerprint

FINGERPRINT = Fingerprint("test/model", "cfg0123456789abc", "float32")
LAYERS, KV_HEADS, HEAD_DIM = 3, 2, 8
LAYOUT = (LAYERS, KV_HEADS, HEAD_DIM)


def random_kv(tokens: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(LAYERS, 2, KV_HEADS, tokens, HEAD_DIM, generator=generator).to(dtype)


def token_ids(count: int, start: int = 100) -> list[int]:
    return list(range(start, start + count))


class Recorder:
    """Collects what the store logs, so a test can ask for exactly one line."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)


@pytest.fixture
def log() -> Recorder:
    return Recorder()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path / "snapshots"


@pytest.fixture
def store(folder: Path, log: Recorder) -> SnapshotStore:
    return SnapshotStore(folder, FINGERPRINT, max_disk_bytes=10_000_000, log=log)


def snapshot_path(folder: Path, session_id: str) -> Path:
    return folder / f"{session_id}.safetensors"


def rewrite_header(path: Path, **changes: str) -> None:
    """Rewrite a snapshot's header fields, keeping the tensor (and the now stale checksum)."""
    with safe_open(str(path), framework="pt") as reader:
        header = dict(reader.metadata())
        tensors = {name: reader.get_tensor(name) for name in reader.keys()}
    header.update(changes)
    path.write_bytes(safetensors.torch.save(tensors, metadata=header))


def assert_refused(store: SnapshotStore, log: Recorder, session_id: str, *words: str, dtype=torch.float32) -> None:
    """load() returned None, logged one line naming the session, and last_error says why."""
    assert store.load(session_id, LAYOUT, dtype) is None
    reason = store.last_error(session_id)
    assert reason is not None
    for word in words:
        assert word in reason.lower(), reason
    assert len(log.lines) == 1, log.lines
    assert f"session {session_id} ignored" in log.lines[0]
    assert reason in log.lines[0] and "recomputing" in log.lines[0]


# ---- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_round_trip_returns_identical_kv_and_token_ids(folder: Path, log: Recorder, dtype: torch.dtype) -> None:
    fingerprint = Fingerprint(FINGERPRINT.model_id, FINGERPRINT.config_hash, str(dtype).removeprefix("torch."))
    store = SnapshotStore(folder, fingerprint, max_disk_bytes=10_000_000, log=log)
    kv = random_kv(12, dtype)
    ids = [0, 1, 49151, 2**31 + 5, 7, 7, 7, 13, 200, 3, 4, 5]

    written = store.save("chat-1", kv, ids)
    snapshot = store.load("chat-1", LAYOUT, dtype)

    assert written == snapshot_path(folder, "chat-1").stat().st_size > 0
    assert snapshot is not None
    assert snapshot.token_ids == ids
    assert snapshot.kv.dtype == dtype and snapshot.kv.device.type == "cpu" and snapshot.kv.is_contiguous()
    assert torch.equal(snapshot.kv.view(torch.uint8), kv.view(torch.uint8))  # bit for bit, NaN-safe
    assert store.last_error("chat-1") is None and log.lines == []


def test_save_of_a_non_contiguous_slice_stores_only_the_valid_tokens(store: SnapshotStore, folder: Path) -> None:
    capacity_cache = random_kv(32)
    valid = capacity_cache[:, :, :, :5]
    assert not valid.is_contiguous()

    store.save("s", valid, token_ids(5))
    snapshot = store.load("s", LAYOUT, torch.float32)

    assert snapshot is not None and snapshot.kv.shape == (LAYERS, 2, KV_HEADS, 5, HEAD_DIM)
    assert torch.equal(snapshot.kv, valid)


def test_header_records_format_fingerprint_dtype_shape_tokens_and_checksum(store: SnapshotStore, folder: Path) -> None:
    ids = token_ids(6)
    store.save("s", random_kv(6), ids)

    with safe_open(str(snapshot_path(folder, "s")), framework="pt") as reader:
        header = reader.metadata()
        assert list(reader.keys()) == ["kv"]

    assert header["format"] == FORMAT_NAME and header["format_version"] == "1"
    assert (header["model_id"], header["model_config_hash"], header["model_dtype"]) == (
        FINGERPRINT.model_id,
        FINGERPRINT.config_hash,
        FINGERPRINT.dtype,
    )
    assert header["kv_dtype"] == "float32"
    assert header["kv_shape"] == f"{LAYERS},2,{KV_HEADS},6,{HEAD_DIM}"
    assert header["token_count"] == "6"
    assert list(struct.unpack("<6I", base64.b64decode(header["token_ids"]))) == ids
    assert header["checksum"].startswith("sha256:") and len(header["checksum"]) == len("sha256:") + 64


def test_matches_prompt_accepts_prefixes_and_rejects_anything_else() -> None:
    snapshot = Snapshot(token_ids=[1, 2, 3], kv=random_kv(3))

    assert matches_prompt(snapshot, [1, 2, 3])
    assert matches_prompt(snapshot, [1, 2, 3, 4, 5])
    assert not matches_prompt(snapshot, [1, 2])
    assert not matches_prompt(snapshot, [1, 2, 4, 5])
    assert not matches_prompt(snapshot, [])


# ---- damage and mismatches: None, one line, no exception -----------------------------------------


@pytest.mark.parametrize(
    "keep", ["first 4 bytes", "half the header", "all but the last tensor byte", "half the tensor"]
)
def test_truncated_file_is_refused(store: SnapshotStore, log: Recorder, folder: Path, keep: str) -> None:
    store.save("s", random_kv(8), token_ids(8))
    path = snapshot_path(folder, "s")
    data = path.read_bytes()
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    cut = {
        "first 4 bytes": 4,
        "half the header": header_end // 2,
        "all but the last tensor byte": len(data) - 1,
        "half the tensor": (header_end + len(data)) // 2,
    }[keep]
    path.write_bytes(data[:cut])

    assert_refused(store, log, "s", "safetensors")


@pytest.mark.parametrize("where", ["first tensor byte", "middle", "last tensor byte"])
def test_flipped_byte_in_tensor_data_fails_the_checksum(
    store: SnapshotStore, log: Recorder, folder: Path, where: str
) -> None:
    store.save("s", random_kv(8), token_ids(8))
    path = snapshot_path(folder, "s")
    data = bytearray(path.read_bytes())
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    position = {"first tensor byte": header_end, "middle": (header_end + len(data)) // 2, "last tensor byte": -1}[where]
    data[position] ^= 0x01  # one bit: the smallest damage there is

    path.write_bytes(bytes(data))

    assert_refused(store, log, "s", "checksum")


def _flip_inside(data: bytearray, marker: bytes, offset: int, mask: int = 0x01) -> None:
    position = data.index(marker) + offset
    data[position] ^= mask


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        ("length prefix", ("safetensors",)),
        ("json syntax", ("safetensors",)),
        ("token ids value", ("checksum",)),
        ("kv shape value", ()),
        ("model id value", ("different model",)),
        ("checksum value", ("checksum",)),
    ],
)
def test_flipped_byte_in_header_is_refused(
    store: SnapshotStore, log: Recorder, folder: Path, damage: str, words: tuple[str, ...]
) -> None:
    store.save("s", random_kv(8), token_ids(8))
    path = snapshot_path(folder, "s")
    data = bytearray(path.read_bytes())
    if damage == "length prefix":
        data[1] ^= 0x01
    elif damage == "json syntax":
        _flip_inside(data, b'"__metadata__":{', len(b'"__metadata__":{') - 1)  # "{" becomes "z"
    elif damage == "token ids value":
        # 0x20 swaps a letter's case, so the base64 stays valid and only the checksum can tell
        _flip_inside(data, b'"token_ids":"', len(b'"token_ids":"') + 3, mask=0x20)
    elif damage == "kv shape value":
        _flip_inside(data, b'"kv_shape":"', len(b'"kv_shape":"'))  # "3" becomes "2"
    elif damage == "model id value":
        _flip_inside(data, b'"model_id":"', len(b'"model_id":"'))
    else:
        _flip_inside(data, b'"checksum":"sha256:', len(b'"checksum":"sha256:') + 10)
    path.write_bytes(bytes(data))

    assert_refused(store, log, "s", *words)


@pytest.mark.parametrize(
    "running",
    [
        Fingerprint("other/model", FINGERPRINT.config_hash, FINGERPRINT.dtype),
        Fingerprint(FINGERPRINT.model_id, "ffffffffffffffff", FINGERPRINT.dtype),
    ],
    ids=["other model id", "other config hash"],
)
def test_snapshot_from_a_different_model_is_refused(folder: Path, log: Recorder, running: Fingerprint) -> None:
    SnapshotStore(folder, FINGERPRINT, 10_000_000, log=log).save("s", random_kv(4), token_ids(4))
    other = SnapshotStore(folder, running, 10_000_000, log=log)

    assert_refused(other, log, "s", "different model", FINGERPRINT.model_id)


def test_snapshot_made_with_the_model_in_another_dtype_is_refused(folder: Path, log: Recorder) -> None:
    SnapshotStore(folder, FINGERPRINT, 10_000_000, log=log).save("s", random_kv(4), token_ids(4))
    bf16_model = Fingerprint(FINGERPRINT.model_id, FINGERPRINT.config_hash, "bfloat16")

    assert_refused(SnapshotStore(folder, bf16_model, 10_000_000, log=log), log, "s", "float32", "bfloat16")


def test_snapshot_in_another_kv_dtype_than_asked_for_is_refused(store: SnapshotStore, log: Recorder) -> None:
    store.save("s", random_kv(4, torch.float32), token_ids(4))

    # "asked for": the header check refuses before the tensor is read
    assert_refused(store, log, "s", "float32", "bfloat16 asked for", dtype=torch.bfloat16)


def test_header_dtype_that_lies_about_the_tensor_is_refused(store: SnapshotStore, log: Recorder, folder: Path) -> None:
    store.save("s", random_kv(4, torch.bfloat16), token_ids(4))
    rewrite_header(snapshot_path(folder, "s"), kv_dtype="float32")

    assert_refused(store, log, "s", "bfloat16")


@pytest.mark.parametrize(
    "layout", [(LAYERS + 1, KV_HEADS, HEAD_DIM), (LAYERS, KV_HEADS * 2, HEAD_DIM), (LAYERS, KV_HEADS, HEAD_DIM // 2)]
)
def test_snapshot_with_another_layout_is_refused(
    store: SnapshotStore, log: Recorder, layout: tuple[int, int, int]
) -> None:
    store.save("s", random_kv(4), token_ids(4))

    assert store.load("s", layout, torch.float32) is None
    assert "layout" in store.last_error("s")
    assert len(log.lines) == 1


def test_token_count_that_differs_from_the_kv_length_is_refused(
    store: SnapshotStore, log: Recorder, folder: Path
) -> None:
    store.save("s", random_kv(4), token_ids(4))
    rewrite_header(snapshot_path(folder, "s"), token_count="5")

    assert_refused(store, log, "s", "5 tokens", "holds 4")


def test_token_ids_list_shorter_than_the_kv_is_refused(store: SnapshotStore, log: Recorder, folder: Path) -> None:
    store.save("s", random_kv(4), token_ids(4))
    rewrite_header(snapshot_path(folder, "s"), token_ids=base64.b64encode(struct.pack("<3I", 1, 2, 3)).decode())

    assert_refused(store, log, "s", "token ids")


def test_token_ids_swapped_for_others_of_the_same_length_fail_the_checksum(
    store: SnapshotStore, log: Recorder, folder: Path
) -> None:
    store.save("s", random_kv(4), [1, 2, 3, 4])
    rewrite_header(snapshot_path(folder, "s"), token_ids=base64.b64encode(struct.pack("<4I", 1, 2, 3, 5)).decode())

    assert_refused(store, log, "s", "checksum")


def test_future_format_version_is_refused(store: SnapshotStore, log: Recorder, folder: Path) -> None:
    store.save("s", random_kv(4), token_ids(4))
    rewrite_header(snapshot_path(folder, "s"), format_version="2")

    assert_refused(store, log, "s", "version")


def test_safetensors_file_that_is_not_a_snapshot_is_refused(store: SnapshotStore, log: Recorder, folder: Path) -> None:
    folder.mkdir()
    safetensors.torch.save_file({"weight": torch.zeros(2, 2)}, str(snapshot_path(folder, "s")))

    assert_refused(store, log, "s", "not a chatkv")


def test_snapshot_with_an_extra_tensor_is_refused(store: SnapshotStore, log: Recorder, folder: Path) -> None:
    store.save("s", random_kv(4), token_ids(4))
    path = snapshot_path(folder, "s")
    with safe_open(str(path), framework="pt") as reader:
        header, kv = reader.metadata(), reader.get_tensor("kv")
    path.write_bytes(safetensors.torch.save({"kv": kv, "extra": torch.zeros(1)}, metadata=header))

    assert_refused(store, log, "s", "tensors")


class _LeavesAMark:
    """Unpickling this creates a file: proof, if the file appears, that something unpickled the snapshot."""

    def __init__(self, mark: Path) -> None:
        self.mark = mark

    def __reduce__(self):
        return (pathlib.Path.touch, (self.mark,))


@pytest.mark.parametrize("content", ["random bytes", "json", "pickle", "torch.save", "empty"])
def test_file_that_is_not_safetensors_is_refused_and_never_unpickled(
    store: SnapshotStore, log: Recorder, folder: Path, tmp_path: Path, content: str
) -> None:
    mark = tmp_path / "unpickled"
    folder.mkdir()
    path = snapshot_path(folder, "s")
    if content == "random bytes":
        path.write_bytes(random.Random(1).randbytes(4096))
    elif content == "json":
        path.write_text(json.dumps({"format": FORMAT_NAME, "token_ids": [1, 2, 3]}))
    elif content == "pickle":
        path.write_bytes(pickle.dumps({"kv": _LeavesAMark(mark)}))
    elif content == "torch.save":
        torch.save({"kv": random_kv(2), "hook": _LeavesAMark(mark)}, path)
    else:
        path.write_bytes(b"")

    assert_refused(store, log, "s", "safetensors")
    assert not mark.exists()


def test_missing_file_gives_none_and_a_reason_without_logging(store: SnapshotStore, log: Recorder) -> None:
    assert store.load("never-saved", LAYOUT, torch.float32) is None
    assert "no snapshot" in store.last_error("never-saved")
    assert log.lines == []


def test_successful_load_clears_the_previous_error(store: SnapshotStore, log: Recorder) -> None:
    store.load("s", LAYOUT, torch.float32)
    store.save("s", random_kv(4), token_ids(4))

    assert store.load("s", LAYOUT, torch.float32) is not None
    assert store.last_error("s") is None


def test_damaged_snapshot_is_rewritten_by_the_next_save_of_the_same_tokens(
    store: SnapshotStore, log: Recorder, folder: Path
) -> None:
    kv, ids = random_kv(4), token_ids(4)
    store.save("s", kv, ids)
    path = snapshot_path(folder, "s")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert store.load("s", LAYOUT, torch.float32) is None

    assert store.save("s", kv, ids) > 0
    assert store.load("s", LAYOUT, torch.float32) is not None


# ---- atomic writes -------------------------------------------------------------------------------


def _leftover_temp_files(folder: Path) -> list[str]:
    return [name for name in os.listdir(folder) if name.endswith(".tmp")]


def test_write_interrupted_before_the_rename_keeps_the_previous_snapshot(
    store: SnapshotStore, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old_kv, old_ids = random_kv(4, seed=1), token_ids(4)
    store.save("s", old_kv, old_ids)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.save("s", random_kv(9, seed=2), token_ids(9, start=500))
    monkeypatch.undo()

    snapshot = store.load("s", LAYOUT, torch.float32)
    assert snapshot is not None and snapshot.token_ids == old_ids and torch.equal(snapshot.kv, old_kv)
    assert _leftover_temp_files(folder) == []


def test_write_failing_with_a_full_disk_keeps_the_previous_snapshot_and_says_so(
    store: SnapshotStore, log: Recorder, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old_kv, old_ids = random_kv(4, seed=1), token_ids(4)
    store.save("s", old_kv, old_ids)

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    written = store.save("s", random_kv(9, seed=2), token_ids(9, start=500))
    monkeypatch.undo()

    assert written == 0
    assert len(log.lines) == 1 and "not saved" in log.lines[0] and "No space left" in log.lines[0]
    snapshot = store.load("s", LAYOUT, torch.float32)
    assert snapshot is not None and snapshot.token_ids == old_ids and torch.equal(snapshot.kv, old_kv)
    assert _leftover_temp_files(folder) == []


def test_stale_temp_file_of_a_killed_writer_is_removed_and_a_fresh_one_kept(folder: Path, log: Recorder) -> None:
    folder.mkdir()
    stale = folder / ".s.safetensors.abc123.tmp"
    fresh = folder / ".t.safetensors.def456.tmp"
    stale.write_bytes(b"half a snapshot")
    fresh.write_bytes(b"a write in progress")
    os.utime(stale, (1_000_000, 1_000_000))

    SnapshotStore(folder, FINGERPRINT, 10_000_000, log=log)

    assert not stale.exists() and fresh.exists()


# ---- the disk budget -----------------------------------------------------------------------------


def _snapshot_size(tmp_path: Path, tokens: int) -> int:
    probe = SnapshotStore(tmp_path / "probe", FINGERPRINT, 10_000_000)
    return probe.save("probe", random_kv(tokens), token_ids(tokens))


def test_budget_evicts_the_least_recently_used_snapshot(tmp_path: Path, folder: Path, log: Recorder) -> None:
    size = _snapshot_size(tmp_path, 10)
    store = SnapshotStore(folder, FINGERPRINT, max_disk_bytes=2 * size + size // 2, log=log)
    store.save("a", random_kv(10, seed=1), token_ids(10))
    store.save("b", random_kv(10, seed=2), token_ids(10))
    # Writes within one clock tick share an mtime; set a clear order: a older than b.
    os.utime(snapshot_path(folder, "a"), ns=(1_000_000_000, 1_000_000_000))
    os.utime(snapshot_path(folder, "b"), ns=(2_000_000_000, 2_000_000_000))
    assert store.load("a", LAYOUT, torch.float32) is not None  # now a is the most recently used

    store.save("c", random_kv(10, seed=3), token_ids(10))

    assert store.has("a") and store.has("c") and not store.has("b")
    assert store.disk_bytes() == 2 * size <= store.max_disk_bytes
    assert store.load("b", LAYOUT, torch.float32) is None


def test_budget_is_never_exceeded_across_many_saves(tmp_path: Path, folder: Path, log: Recorder) -> None:
    budget = 5 * _snapshot_size(tmp_path, 10)
    store = SnapshotStore(folder, FINGERPRINT, max_disk_bytes=budget, log=log)
    generator = torch.Generator().manual_seed(7)

    for step in range(40):
        session = f"s{int(torch.randint(0, 8, (1,), generator=generator))}"
        tokens = int(torch.randint(1, 30, (1,), generator=generator))
        store.save(session, random_kv(tokens, seed=step), token_ids(tokens, start=step))
        on_disk = sum(path.stat().st_size for path in folder.iterdir())
        assert on_disk == store.disk_bytes() <= budget

    assert log.lines == []


def test_snapshot_larger_than_the_whole_budget_is_not_written(tmp_path: Path, folder: Path, log: Recorder) -> None:
    small = _snapshot_size(tmp_path, 4)
    store = SnapshotStore(folder, FINGERPRINT, max_disk_bytes=small * 2, log=log)
    store.save("small", random_kv(4), token_ids(4))

    assert store.save("huge", random_kv(200), token_ids(200)) == 0
    assert store.save("huge", random_kv(201), token_ids(201)) == 0

    assert not store.has("huge") and store.has("small")
    assert len(log.lines) == 1 and "session huge not saved" in log.lines[0] and "budget" in log.lines[0]


def test_saving_an_unchanged_snapshot_skips_the_write(store: SnapshotStore, folder: Path) -> None:
    kv, ids = random_kv(4), token_ids(4)
    assert store.save("s", kv, ids) > 0
    inode = snapshot_path(folder, "s").stat().st_ino

    assert store.save("s", kv, ids) == 0
    assert snapshot_path(folder, "s").stat().st_ino == inode  # the atomic rename would have made a new file

    assert store.save("s", random_kv(5), token_ids(5)) > 0
    assert store.load("s", LAYOUT, torch.float32).token_ids == token_ids(5)


def test_sizes_and_delete_agree_with_the_files(store: SnapshotStore, folder: Path) -> None:
    written_a = store.save("a", random_kv(4), token_ids(4))
    written_b = store.save("b", random_kv(7), token_ids(7))

    assert store.session_bytes("a") == written_a == snapshot_path(folder, "a").stat().st_size
    assert store.disk_bytes() == written_a + written_b

    store.delete("a")
    store.delete("a")  # deleting twice is fine

    assert not store.has("a") and store.session_bytes("a") == 0
    assert store.disk_bytes() == written_b


# ---- privacy and hostile ids ---------------------------------------------------------------------


def test_folder_is_private_and_files_are_owner_only(store: SnapshotStore, folder: Path) -> None:
    store.save("s", random_kv(4), token_ids(4))

    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(snapshot_path(folder, "s").stat().st_mode) == 0o600


HOSTILE_IDS = [
    "../escape", "a/b", "/etc/passwd", "", ".hidden", "..", "-dash", "a" * 65, "abc\n", "a b", "ünicode", "a\x00b"
]


@pytest.mark.parametrize("session_id", HOSTILE_IDS, ids=repr)
def test_hostile_session_id_is_refused_before_touching_the_disk(
    store: SnapshotStore, log: Recorder, tmp_path: Path, session_id: str
) -> None:
    before = sorted(tmp_path.rglob("*"))

    with pytest.raises(SnapshotError, match="not a valid session id"):
        store.save(session_id, random_kv(2), token_ids(2))
    for refused in (store.has, store.delete, store.session_bytes):
        with pytest.raises(SnapshotError, match="not a valid session id"):
            refused(session_id)
    assert store.load(session_id, LAYOUT, torch.float32) is None
    assert "not a valid session id" in store.last_error(session_id)
    assert len(log.lines) == 1

    assert sorted(tmp_path.rglob("*")) == before


def test_longest_valid_session_id_is_accepted(store: SnapshotStore) -> None:
    session_id = "A" + "b_-9" * 15 + "xyz"
    assert len(session_id) == 64

    assert store.save(session_id, random_kv(2), token_ids(2)) > 0
    assert store.load(session_id, LAYOUT, torch.float32) is not None


@pytest.mark.parametrize(
    ("kv", "ids"),
    [
        (random_kv(4), token_ids(5)),
        (torch.zeros(2, 2, 8), token_ids(2)),
        (random_kv(2), [1, -1]),
        (random_kv(2), [1, 2**32]),
    ],
    ids=["length mismatch", "wrong rank", "negative id", "id too large"],
)
def test_save_refuses_kv_that_does_not_fit_its_token_ids(
    store: SnapshotStore, folder: Path, kv: torch.Tensor, ids: list[int]
) -> None:
    with pytest.raises(SnapshotError):
        store.save("s", kv, ids)

    assert not store.has("s")
