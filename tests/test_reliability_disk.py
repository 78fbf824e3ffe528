"""A full disk and a read-only folder while saving: the user is told, the previous copy stays, the app goes on.

The store's own reaction to each errno is covered in test_store.py (ENOSPC, EROFS, EACCES, EDQUOT,
failed rename) and the snapshot store's in test_snapshot.py; here the whole app meets them: the
TUI, the engine's snapshots, and a real headless chatkv on a 1 MiB tmpfs that fills up and turns
read-only under it.
"""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import time
from pathlib import Path

import pytest

import chatkv.atomic as atomic
import chatkv.engine.snapshot as snapshot_module
import chatkv.store as store_module
from chatkv.config import Settings
from chatkv.conversation import Message
from chatkv.engine import Engine, Sampling
from chatkv.engine.engine import eos_token_ids
from chatkv.engine.reference import greedy_full_recompute
from chatkv.paths import Paths
from chatkv.store import ConversationStore
from chatkv.tui.app import AppOptions, make_app
from test_reliability_support import HeadlessChild, run_script, script_bytes

FULL = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def failing_for(suffix: str, error: OSError, real):
    """write_bytes_atomic that raises ``error`` for files ending in ``suffix`` while ``failing['on']``."""
    state = {"on": True}

    def write(path, data):
        if state["on"] and str(path).endswith(suffix):
            raise OSError(error.errno, error.strerror)
        return real(path, data)

    return write, state


async def wait_until(pilot, condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await pilot.pause(0.02)


# ---- the TUI ------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
async def test_a_failed_save_in_the_tui_is_shown_keeps_the_previous_copy_and_the_chat_goes_on(
        tiny_bundle, data_dir: Path, monkeypatch, code: int):
    paths = Paths.resolve(data_dir)
    store = ConversationStore(paths)
    settings = Settings()
    settings.generation.max_new_tokens = 4
    engine = Engine(tiny_bundle, settings, snapshot_dir=paths.snapshots).start()
    write, fault = failing_for(".json", OSError(code, os.strerror(code)), store_module.write_bytes_atomic)
    fault["on"] = False
    monkeypatch.setattr(store_module, "write_bytes_atomic", write)
    app = make_app(settings, engine, store, paths.user_themes, AppOptions())
    shown: list[tuple[str, str]] = []
    real_notify = app.notify
    app.notify = lambda message, *args, severity="information", **kwargs: (
        shown.append((str(message), severity)), real_notify(message, *args, severity=severity, **kwargs))[1]
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            tab = app.chat_tabs.current
            saved_file = store.session_file(tab.session_id)

            async def send(text: str, replies: int) -> None:
                await pilot.press(*text, "enter")
                await wait_until(pilot, lambda: sum(m.role == "assistant" for m in tab.conversation.messages) == replies
                                 and not tab.generating)

            await send("one", 1)
            good_copy = saved_file.read_bytes()
            fault["on"] = True
            await send("two", 2)
            errors = [message for message, severity in shown if severity == "error"]
            assert errors, "the failed save was not shown"
            words = "disk is full" if code == errno.ENOSPC else "the folder is read-only"
            assert f"Could not save conversation {tab.conversation.name!r}: {words}" in errors[-1]
            assert "Your previous copy is kept." in errors[-1]
            assert saved_file.read_bytes() == good_copy

            fault["on"] = False  # space freed, or the folder writable again: the next save has everything
            await send("three", 3)
            on_disk = store.get(tab.session_id).messages
            assert [m.content for m in on_disk if m.role == "user"] == ["one", "two", "three"]
            assert on_disk == tab.conversation.messages
    finally:
        await asyncio.to_thread(engine.close)


# ---- headless -----------------------------------------------------------------------------------


async def test_a_failed_save_in_headless_mode_is_an_error_event_and_the_script_goes_on(
        tiny_bundle, data_dir: Path, monkeypatch):
    paths = Paths.resolve(data_dir)
    settings = Settings()
    settings.generation.max_new_tokens = 4
    write, fault = failing_for("a.json", FULL, store_module.write_bytes_atomic)
    fault["on"] = False
    monkeypatch.setattr(store_module, "write_bytes_atomic", write)
    engine = Engine(tiny_bundle, settings, snapshot_dir=paths.snapshots).start()
    script = script_bytes({"op": "open", "tab": "a"}, {"op": "send", "tab": "a", "text": "one"}, {"op": "wait"})
    try:
        await run_script(engine, settings, paths, script)
        fault["on"] = True
        run = await run_script(engine, settings, paths, script_bytes(
            {"op": "open", "tab": "a"}, {"op": "send", "tab": "a", "text": "two"}, {"op": "wait"}))
    finally:
        await asyncio.to_thread(engine.close)

    assert [event["turn"] for event in run.of("turn", "a")] == [2]  # the chat went on
    errors = run.of("error", "a")
    assert errors and "disk is full" in errors[0]["message"] and run.errors >= 1


# ---- KV snapshots ---------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_snapshot_that_cannot_be_written_is_reported_and_the_previous_one_restores_exactly(
        tiny_bundle, tmp_path: Path, monkeypatch, code: int):
    notes: list[str] = []
    settings = Settings()
    history: list[Message] = []

    def chat(engine: Engine, text: str):
        history.append(Message("user", text))
        result = engine.submit("s", list(history), Sampling(max_new_tokens=6)).wait(60)
        assert result.error is None
        history.append(Message("assistant", result.reply, token_ids=result.reply_ids))
        return result

    with Engine(tiny_bundle, settings, snapshot_dir=tmp_path, log=notes.append) as engine:
        first = chat(engine, "first")
        assert engine.snapshot() == 1
        good = (tmp_path / "s.safetensors").read_bytes()
        chat(engine, "second")
        write, _ = failing_for(".safetensors", OSError(code, os.strerror(code)), snapshot_module.write_bytes_atomic)
        monkeypatch.setattr(snapshot_module, "write_bytes_atomic", write)
        assert engine.snapshot() == 0
        assert any("snapshot for session s not saved" in note and os.strerror(code) in note for note in notes), notes
        third = chat(engine, "third")  # the engine serves on
    assert (tmp_path / "s.safetensors").read_bytes() == good
    assert third.reply_ids == greedy_full_recompute(tiny_bundle.model, third.prompt_ids, 6, eos_token_ids(tiny_bundle))

    with Engine(tiny_bundle, settings, snapshot_dir=tmp_path) as restarted:  # the next launch
        fourth = chat(restarted, "fourth")
    assert fourth.reused_from == "disk" and fourth.reused_tokens == first.prompt_tokens + first.new_tokens - 1
    assert fourth.reply_ids == greedy_full_recompute(tiny_bundle.model, fourth.prompt_ids, 6, eos_token_ids(tiny_bundle))


def test_evictions_that_cannot_spill_to_a_full_disk_still_serve_every_turn_exactly(tiny_bundle, tmp_path: Path, monkeypatch):
    notes: list[str] = []
    settings = Settings()
    settings.kv.max_sessions = 1  # every turn of the other session evicts this one, and tries to spill it

    def disk_fills_during_the_write(fd: int) -> None:  # the temp file exists and holds data by now
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic.os, "fsync", disk_fills_during_the_write)
    histories: dict[str, list[Message]] = {"x": [], "y": []}
    with Engine(tiny_bundle, settings, snapshot_dir=tmp_path, log=notes.append) as engine:
        for turn in range(3):
            for session_id, history in histories.items():
                history.append(Message("user", f"{session_id} {turn}"))
                result = engine.submit(session_id, list(history), Sampling(max_new_tokens=5)).wait(60)
                # nothing can come from disk (every spill failed); shared prefix blocks still in the pool may be reused
                assert result.error is None and result.reused_from != "disk"
                assert result.reply_ids == greedy_full_recompute(tiny_bundle.model, result.prompt_ids, 5,
                                                                 eos_token_ids(tiny_bundle))
                history.append(Message("assistant", result.reply, token_ids=result.reply_ids))
        assert engine.stats().evictions >= 5
    assert any("No space left on device" in note for note in notes)
    assert list(tmp_path.iterdir()) == []  # no partial snapshot left behind


# ---- a real full disk and a real read-only folder --------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 1 MiB tmpfs (root only; skipped elsewhere)."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip() or made.returncode}); the injected-OSError tests cover this")
    mounts = [mount_point]
    try:
        yield mount_point, mounts
    finally:
        for point in reversed(mounts):
            subprocess.run(["umount", "-l", str(point)], capture_output=True)


def fill(folder: Path) -> Path:
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


@pytest.mark.real_model
def test_headless_chatkv_on_a_disk_that_fills_up_and_turns_read_only_keeps_the_last_good_copy_and_goes_on(
        small_disk, smollm2_dir: Path):
    home, mounts = small_disk
    paths = Paths.resolve(home)
    saved = paths.sessions / "a.json"

    def users_on_disk() -> list[str]:
        return [m.content for m in ConversationStore(paths).get("a").messages if m.role == "user"]

    child = HeadlessChild(home, smollm2_dir, "--no-snapshot")
    try:
        child.send(op="open", tab="a")
        child.send(op="send", tab="a", text="one", max_new_tokens=3)
        child.turn("a")
        assert users_on_disk() == ["one"]

        filler = fill(home)  # disk full
        good_copy = saved.read_bytes()
        child.send(op="send", tab="a", text="two", max_new_tokens=3)
        full = child.expect(lambda e: e["event"] == "error" and e["tab"] == "a")
        assert "disk is full" in full["message"] and "previous copy is kept" in full["message"]
        assert child.expect(lambda e: e["event"] == "turn" and e["tab"] == "a")["turn"] == 2
        assert saved.read_bytes() == good_copy
        child.discard_unclaimed()  # the reply's save failed the same way

        filler.unlink()  # space again: the next save writes everything the app still holds
        child.send(op="send", tab="a", text="three", max_new_tokens=3)
        child.turn("a")
        assert users_on_disk() == ["one", "two", "three"]

        # the conversations folder turns read-only under the running app
        subprocess.run(["mount", "--bind", str(paths.sessions), str(paths.sessions)], check=True)
        mounts.append(paths.sessions)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(paths.sessions)], check=True)
        good_copy = saved.read_bytes()
        child.send(op="send", tab="a", text="four", max_new_tokens=3)
        read_only = child.expect(lambda e: e["event"] == "error" and e["tab"] == "a")
        assert "read-only" in read_only["message"] and "previous copy is kept" in read_only["message"]
        assert child.expect(lambda e: e["event"] == "turn" and e["tab"] == "a")["turn"] == 4
        assert saved.read_bytes() == good_copy
        child.discard_unclaimed()  # the later errors of the same failed saves

        subprocess.run(["umount", str(paths.sessions)], check=True)
        mounts.remove(paths.sessions)
        child.send(op="send", tab="a", text="five", max_new_tokens=3)
        child.turn("a")
        code = child.finish()
    finally:
        child.close()
    assert users_on_disk() == ["one", "two", "three", "four", "five"]
    assert not [line for line in child.stderr_lines if "Traceback" in line]
    assert code == 1  # the failed saves were error events
