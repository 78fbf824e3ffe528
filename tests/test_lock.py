"""DataDirLock: a second chatkv on the same folder is refused with a useful message; the lock dies with its process."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from chatkv.conversation import Message
from chatkv.lock import DataDirLock, DataDirLocked
from chatkv.paths import Paths
from chatkv.store import ConversationStore

# a second chatkv, as far as the lock can tell: another process trying the same folder
TRY_LOCK = textwrap.dedent("""
    import sys
    from chatkv.lock import DataDirLock, DataDirLocked
    try:
        DataDirLock(sys.argv[1]).acquire()
    except DataDirLocked as exc:
        print(exc)
        sys.exit(3)
    print("acquired")
""")

HOLD_LOCK = textwrap.dedent("""
    import sys
    from chatkv.lock import DataDirLock
    with DataDirLock(sys.argv[1]):
        print("holding", flush=True)
        sys.stdin.readline()
""")


def try_lock_in_another_process(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", TRY_LOCK, str(folder)], capture_output=True, text=True, timeout=30)


@pytest.fixture
def holder(tmp_path: Path):
    """A separate process holding the lock on tmp_path/data until its stdin closes."""
    folder = tmp_path / "data"
    process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "holding"
    yield folder, process
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)


def test_second_process_is_refused_with_pid_folder_and_advice_while_the_first_keeps_working(data_dir: Path):
    paths = Paths.resolve()
    store = ConversationStore(paths)
    with DataDirLock(paths.data):
        result = try_lock_in_another_process(paths.data)

        assert result.returncode == 3, result.stderr
        message = result.stdout.strip()
        assert f"Another chatkv (pid {os.getpid()}) is using {paths.data}" in message
        assert "Close it" in message and "--data-dir" in message
        # the first instance is unaffected: it still saves
        conversation = store.new_conversation("still mine")
        conversation.messages.append(Message("user", "hello"))
        store.save(conversation)
        assert store.get(conversation.id) == conversation


def test_lock_held_by_another_process_raises_data_dir_locked_naming_its_pid(holder):
    folder, process = holder

    with pytest.raises(DataDirLocked) as caught:
        DataDirLock(folder).acquire()

    assert caught.value.pid == process.pid
    assert caught.value.folder == folder
    assert f"pid {process.pid}" in str(caught.value)


def test_lock_is_free_again_once_the_holder_exits(holder):
    folder, process = holder
    process.stdin.close()
    assert process.wait(timeout=30) == 0

    with DataDirLock(folder) as lock:
        assert lock.held


def test_lock_is_freed_when_the_holder_is_killed(holder):
    # no cleanup code runs on SIGKILL: only the kernel's flock release can free it
    folder, process = holder
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)

    lock = DataDirLock(folder).acquire()
    assert lock.held
    assert (folder / ".lock").read_text().strip() == str(os.getpid())
    lock.release()


def test_release_lets_another_process_take_the_folder(tmp_path: Path):
    lock = DataDirLock(tmp_path / "data").acquire()
    lock.release()

    assert not lock.held
    assert try_lock_in_another_process(tmp_path / "data").stdout.strip() == "acquired"


def test_second_lock_in_the_same_process_is_refused_too(tmp_path: Path):
    # flock belongs to the open file, so even two stores in one process cannot share a folder by accident
    with DataDirLock(tmp_path):
        with pytest.raises(DataDirLocked):
            DataDirLock(tmp_path).acquire()


def test_acquire_twice_on_the_same_lock_is_harmless(tmp_path: Path):
    lock = DataDirLock(tmp_path)
    with lock:
        assert lock.acquire() is lock
    assert not lock.held


def test_lock_creates_a_private_folder_and_file(tmp_path: Path):
    folder = tmp_path / "fresh"
    with DataDirLock(folder):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert stat.S_IMODE((folder / ".lock").stat().st_mode) == 0o600


def test_message_without_a_readable_pid_still_explains(tmp_path: Path):
    assert str(DataDirLocked(tmp_path, None)).startswith(f"Another chatkv is using {tmp_path}.")
