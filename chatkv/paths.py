"""Where chatkv keeps its files: conversations, caches (KV snapshots, converted models) and config.

platformdirs picks the usual places; ``--data-dir`` or ``CHATKV_HOME`` put all three under one folder.
Every folder chatkv creates is private to the user (0700) and files it writes are 0600.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

APP_NAME = "chatkv"
HOME_ENV = "CHATKV_HOME"


@dataclass(frozen=True)
class Paths:
    data: Path
    cache: Path
    config: Path

    @classmethod
    def resolve(cls, data_dir: str | os.PathLike | None = None) -> "Paths":
        home = data_dir or os.environ.get(HOME_ENV)
        if home:
            root = Path(home).expanduser().resolve()
            return cls(data=root / "data", cache=root / "cache", config=root / "config")
        return cls(
            data=Path(platformdirs.user_data_dir(APP_NAME)),
            cache=Path(platformdirs.user_cache_dir(APP_NAME)),
            config=Path(platformdirs.user_config_dir(APP_NAME)),
        )

    @property
    def sessions(self) -> Path:
        return self.data / "sessions"

    @property
    def snapshots(self) -> Path:
        return self.cache / "snapshots"

    @property
    def models(self) -> Path:
        return self.cache / "models"

    @property
    def config_file(self) -> Path:
        return self.config / "config.toml"

    @property
    def user_themes(self) -> Path:
        return self.config / "themes"

    @property
    def state_file(self) -> Path:
        """Small UI state remembered between launches (theme choice, open tabs)."""
        return self.data / "state.json"


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` and any missing parents readable only by the user; tighten ``path`` if it already exists.

    Parents that already existed keep their mode (they may be shared folders such as ~/.cache).
    """
    path = Path(path)
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)  # mkdir's mode is filtered by the umask
    try:
        os.chmod(path, 0o700)
    except OSError:
        pass  # a folder we do not own (e.g. a shared mount) keeps its mode; writing still works or fails loudly
    return path


def make_private_tree(root: Path) -> None:
    """Folders under ``root`` (itself included) to 0700 and files to 0600, where they are not already.

    For what other tools write with the umask's modes inside our folders: transformers' ``save_pretrained``
    and pip when the model is fetched and converted. Links are left alone; a file we may not change keeps its mode.
    """
    for folder, folder_names, file_names in os.walk(root):
        entries = [(Path(folder), 0o700)] + [(Path(folder) / name, 0o600) for name in file_names]
        for path, mode in entries:
            try:
                info = path.lstat()
                if not path.is_symlink() and info.st_mode & 0o777 != mode:
                    os.chmod(path, mode)
            except OSError:
                pass
