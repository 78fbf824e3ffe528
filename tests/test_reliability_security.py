"""Security: private folders and files, no unpickling on any load path, session ids checked before they reach a path.

Already covered elsewhere, and listed in docs/reliability.md: the store's and the snapshot store's own
modes and id checks (test_store.py, test_snapshot.py), the lock file's mode (test_lock.py), symlinks
and FIFOs posing as sessions (test_store.py), unsafe ids in the sessions CLI (test_sessions_cli.py).
"""

from __future__ import annotations

import os
import pickle
import re
import stat
import subprocess
from pathlib import Path

import pytest
import torch

import chatkv
from chatkv.config import Settings
from chatkv.conversation import Message
from chatkv.engine import Engine, Sampling
from chatkv.engine.snapshot import SnapshotStore
from chatkv.model.loader import Fingerprint, ModelError, load_model
from chatkv.paths import Paths
from chatkv.session_id import SESSION_ID_PATTERN
from chatkv.store import ConversationStore
from test_reliability_support import CHATKV, run_script, script_bytes

PACKAGE = Path(chatkv.__file__).resolve().parent


# ---- private folders and files ------------------------------------------------------------------


def loose_modes(*roots: Path) -> dict[str, str]:
    """Every folder and file under ``roots`` (roots included) that is not private to the user, with its mode."""
    loose = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            mode = stat.S_IMODE(path.lstat().st_mode)
            if mode != (0o700 if path.is_dir() else 0o600):
                loose[str(path)] = oct(mode)
    return loose


@pytest.mark.real_model
def test_after_a_headless_run_with_umask_0_every_folder_is_0700_and_every_file_0600(tmp_path: Path, smollm2_dir: Path):
    # no --data-dir: the real platformdirs locations under a fresh HOME, and a umask that hides nothing
    home = tmp_path / "home"
    home.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "CHATKV_HOME" and not key.startswith("XDG_")}
    completed = subprocess.run(
        [str(CHATKV), "launch", "--headless", "--script", "-", "--model", str(smollm2_dir), "--dtype", "float32"],
        input=script_bytes({"op": "open", "tab": "a"}, {"op": "send", "tab": "a", "text": "hi", "max_new_tokens": 2},
                           {"op": "snapshot"}),
        capture_output=True, timeout=300, preexec_fn=lambda: os.umask(0), env={**env, "HOME": str(home)},
    )

    assert completed.returncode == 0, completed.stderr.decode()
    data, cache = home / ".local" / "share" / "chatkv", home / ".cache" / "chatkv"
    assert (data / "sessions" / "a.json").is_file() and (data / ".lock").is_file()
    assert (cache / "snapshots" / "a.safetensors").is_file()
    assert loose_modes(data, cache) == {}


# ---- no pickle on any load path -------------------------------------------------------------------

UNPICKLING = re.compile(
    r"\bimport\s+(pickle|cPickle|dill|joblib|shelve|marshal)\b|\bfrom\s+(pickle|dill|joblib|shelve|marshal)\b"
    r"|torch\.load\s*\(|\bnp\.load\s*\(|numpy\.load\s*\(|allow_pickle\s*=\s*True|weights_only\s*=\s*False"
    r"|trust_remote_code\s*=\s*True|use_safetensors\s*=\s*False"
)


def test_no_module_of_chatkv_unpickles_or_runs_remote_code():
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if UNPICKLING.search(line)
    ]
    assert found == []


@pytest.fixture
def unpickling_forbidden(monkeypatch):
    """Any unpickling from here on fails loudly, wherever it is hidden."""
    attempts: list[str] = []

    def forbid(name: str):
        def refuse(*args, **kwargs):
            attempts.append(name)
            raise AssertionError(f"{name} called on a load path")
        return refuse

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbid(f"pickle.{name}"))
    monkeypatch.setattr(torch, "load", forbid("torch.load"))
    return attempts


def test_conversations_and_kv_snapshots_load_without_unpickling(data_dir: Path, unpickling_forbidden):
    paths = Paths.resolve(data_dir)
    store = ConversationStore(paths)
    conversation = store.new_conversation("x")
    conversation.messages.append(Message("user", "hi"))
    store.save(conversation)
    snapshots = SnapshotStore(paths.snapshots, Fingerprint("m", "h", "float32"), 2**20)
    snapshots.save("s", torch.zeros(1, 2, 1, 3, 2), [1, 2, 3])

    assert store.load_all() == ([conversation], [])
    assert snapshots.load("s", (1, 1, 2), torch.float32).token_ids == [1, 2, 3]
    assert unpickling_forbidden == []


@pytest.mark.real_model
def test_the_model_loads_from_its_safetensors_checkpoint_without_unpickling(smollm2_dir: Path, models_dir: Path,
                                                                           unpickling_forbidden):
    bundle = load_model(str(smollm2_dir), models_dir, dtype="float32", device="cpu", progress=lambda _: None)

    assert bundle.model_id and unpickling_forbidden == []


def test_a_model_folder_with_only_pickled_weights_is_refused_without_unpickling(
        tmp_path: Path, tiny_bundle, models_dir: Path, unpickling_forbidden):
    folder = tmp_path / "pickled-model"
    tiny_bundle.model.save_pretrained(folder)
    tiny_bundle.tokenizer.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(tiny_bundle.model.state_dict(), folder / "pytorch_model.bin")  # the pickle-based format

    with pytest.raises(ModelError, match="safetensors"):
        load_model(str(folder), models_dir, dtype="float32", device="cpu", progress=lambda _: None)
    assert unpickling_forbidden == []


# ---- session ids that reach the file system --------------------------------------------------------

HOSTILE_TAB_NAMES = ["../../escaped", "a/b", "..", ".hidden", "x" * 65, "tab\x00nul", "C:\\evil", "~root", " "]


async def test_hostile_tab_names_in_headless_mode_never_become_paths(tiny_bundle, tmp_path: Path):
    home = tmp_path / "deep" / "home"
    paths = Paths.resolve(home)
    settings = Settings()
    settings.generation.max_new_tokens = 2
    engine = Engine(tiny_bundle, settings, snapshot_dir=paths.snapshots).start()
    lines = []
    for name in HOSTILE_TAB_NAMES:
        lines += [{"op": "open", "tab": name}, {"op": "send", "tab": name, "text": "hi"}]
    try:
        run = await run_script(engine, settings, paths, script_bytes(*lines, {"op": "wait"}, {"op": "snapshot"}))
    finally:
        engine.close()

    assert sorted(event["tab"] for event in run.of("turn")) == sorted(HOSTILE_TAB_NAMES)  # each tab worked
    outside = [path for path in tmp_path.rglob("*") if home not in path.parents and path != home
               and path not in home.parents]
    assert outside == []
    sessions = sorted(path.name for path in paths.sessions.iterdir())
    snapshots = sorted(path.name for path in paths.snapshots.iterdir())
    assert len(sessions) == len(HOSTILE_TAB_NAMES) == len(snapshots)
    assert all(SESSION_ID_PATTERN.match(name.removesuffix(".json")) for name in sessions)
    assert all(SESSION_ID_PATTERN.match(name.removesuffix(".safetensors")) for name in snapshots)
    names = {conversation.name for conversation in ConversationStore(paths).load_all()[0]}
    assert names == set(HOSTILE_TAB_NAMES)  # each name is kept as the tab's label, never used as a path


def test_a_session_id_that_is_not_a_file_name_never_fails_other_sessions(tiny_bundle, tmp_path: Path):
    settings = Settings()
    settings.kv.max_sessions = 1  # the next session evicts the hostile one, which spills to disk
    with Engine(tiny_bundle, settings, snapshot_dir=tmp_path / "snapshots") as engine:
        try:
            hostile = engine.submit("../../escaped", [Message("user", "hi")], Sampling(max_new_tokens=2)).wait(60)
        except Exception as refused:  # noqa: BLE001 - refusing the id at the door is one good outcome
            hostile = refused
        innocent = engine.submit("innocent", [Message("user", "hi")], Sampling(max_new_tokens=2)).wait(60)

    assert innocent.error is None, innocent.error
    assert not (tmp_path / "escaped").exists() and not (tmp_path.parent / "escaped").exists()
    assert hostile is not None
