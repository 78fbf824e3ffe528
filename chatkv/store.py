"""Saved conversations: one JSON file per session, plus a small file of UI state.

Every write is atomic (temp file, fsync, rename), so a crash or a full disk leaves the previous copy.
A file that cannot be read is moved into ``sessions/quarantine`` and reported, never deleted and never
a crash: the user may want it back, and one bad file must not hide the others.
Session ids become file names, so every id is checked before it reaches the file system.
"""

from __future__ import annotations

import errno
import os
import re
import time
from pathlib import Path
from typing import Any

import orjson

from chatkv.atomic import write_bytes_atomic
from chatkv.conversation import Conversation, new_session_id
from chatkv.paths import Paths, ensure_private_dir
from chatkv.safe_read import UnreadableFile, human_size, read_capped
from chatkv.session_id import SESSION_ID_RULE, is_valid_session_id

# far above any real conversation (a million token ids is ~7 MiB); a bigger file is damage or a trap
MAX_FILE_BYTES = 64 * 1024**2
SESSION_SUFFIX = ".json"
SNAPSHOT_SUFFIX = ".safetensors"
QUARANTINE_FOLDER_NAME = "quarantine"
# the names chatkv.atomic gives its temp files: ".<name>.<random>.tmp"
_TEMP_FILE_PATTERN = re.compile(r"^\..+\.tmp$")
# an interrupted write is older than this; a younger temp file may belong to a save happening right now
# (``chatkv sessions list`` while the app is open), so it is left for a later load
STALE_TEMP_SECONDS = 60.0

DEFAULT_STATE: dict[str, Any] = {"open_tabs": [], "active_tab": None, "theme": None}

_SAVE_REASONS = {
    errno.ENOSPC: "disk is full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the folder is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


class StoreError(Exception):
    """Something about saved conversations the user should hear about; the message is written for them."""


class SessionNotFound(StoreError):
    pass


def validate_session_id(session_id: object) -> str:
    """Return ``session_id`` if it is safe as a file name, else raise ``StoreError``."""
    if not is_valid_session_id(session_id):
        raise StoreError(f"{session_id!r} is not a valid session id: use {SESSION_ID_RULE}")
    return session_id


def parse_json_object(data: bytes) -> dict[str, Any]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnreadableFile(f"it is not UTF-8 text (bad byte at offset {exc.start})") from None
    try:
        # an editor may have added a byte-order mark; it is not part of the JSON
        value = orjson.loads(text.removeprefix("\ufeff"))
    except orjson.JSONDecodeError as exc:
        raise UnreadableFile(f"it is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise UnreadableFile(f"it holds a JSON {type(value).__name__}, not an object")
    return value


def describe_os_error(exc: OSError) -> str:
    return _SAVE_REASONS.get(exc.errno or 0) or exc.strerror or str(exc)


MIN_ID_PREFIX = 4  # as git: shorter starts match too much to mean one conversation


class ConversationStore:
    def __init__(self, paths: Paths, *, max_file_bytes: int = MAX_FILE_BYTES):
        self.paths = paths
        self.max_file_bytes = max_file_bytes

    @property
    def folder(self) -> Path:
        return self.paths.sessions

    @property
    def quarantine_folder(self) -> Path:
        return self.paths.sessions / QUARANTINE_FOLDER_NAME

    def session_file(self, session_id: str) -> Path:
        return self.folder / f"{validate_session_id(session_id)}{SESSION_SUFFIX}"

    def snapshot_file(self, session_id: str) -> Path:
        return self.paths.snapshots / f"{validate_session_id(session_id)}{SNAPSHOT_SUFFIX}"

    # -- conversations ---------------------------------------------------------------------------

    def new_conversation(self, name: str | None = None, system: str = "") -> Conversation:
        """A fresh conversation with a new id; nothing is written until ``save``."""
        session_id = new_session_id()
        return Conversation(id=session_id, name=name or f"Chat {time.strftime('%b %d %H:%M')}", system=system)

    def save(self, conversation: Conversation) -> None:
        """Write the conversation atomically; on failure raise ``StoreError`` and keep the previous file."""
        path = self.session_file(conversation.id)
        record = conversation.to_dict()
        # a conversation the loader would refuse must not be written: fail now, where the bug is
        Conversation.from_dict(record)
        data = orjson.dumps(record)
        label = f"Could not save conversation {conversation.name!r}"

        def kept() -> str:
            return "Your previous copy is kept." if path.exists() else "It has not been saved before."

        if len(data) > self.max_file_bytes:
            raise StoreError(
                f"{label}: it has grown to {human_size(len(data))}, over the {human_size(self.max_file_bytes)} limit; "
                f"start a new conversation. {kept()}"
            )
        try:
            self._ensure_folders()
            write_bytes_atomic(path, data)
        except OSError as exc:
            raise StoreError(f"{label}: {describe_os_error(exc)} ({self.folder}). {kept()}") from exc

    def load_all(self) -> tuple[list[Conversation], list[str]]:
        """Every readable conversation, most recently updated first, and one message per file set aside."""
        conversations: list[Conversation] = []
        messages: list[str] = []
        try:
            entries = sorted(os.scandir(self.folder), key=lambda entry: entry.name)
        except FileNotFoundError:
            return [], []
        except OSError as exc:
            return [], [f"Cannot read the conversations folder {self.folder}: {exc.strerror}"]
        for entry in entries:
            if _TEMP_FILE_PATTERN.match(entry.name):
                self._remove_stale_temp(Path(entry.path))
                continue
            # every *.json here is either loaded or set aside, so nothing is dropped without a word; other
            # names (the quarantine folder, notes the user keeps here) are not ours to judge
            if not entry.name.endswith(SESSION_SUFFIX):
                continue
            path = Path(entry.path)
            try:
                conversations.append(self._read(path))
            except FileNotFoundError:
                continue  # deleted while we were listing
            except UnreadableFile as exc:
                messages.append(self._set_aside(path, exc.reason))
        conversations.sort(key=lambda conversation: (-conversation.updated, conversation.id))
        return conversations, messages

    def get(self, session_id: str) -> Conversation:
        """The saved conversation with this id; ``SessionNotFound`` if none, ``StoreError`` if its file is broken."""
        path = self.session_file(session_id)
        try:
            return self._read(path)
        except FileNotFoundError:
            raise SessionNotFound(f"No saved conversation with id {session_id!r}.") from None
        except UnreadableFile as exc:
            raise StoreError(self._set_aside(path, exc.reason)) from None

    def find(self, id_or_name: str, among: list[Conversation] | None = None) -> Conversation:
        """By exact id, else by a name only one conversation has, else by a unique start of an id (as git takes commit ids).

        ``among``: conversations already loaded with ``load_all``, to avoid reading every file again.
        Raises ``SessionNotFound``, or ``StoreError`` when the name or the start of an id fits several conversations.
        """
        conversations = among if among is not None else self.load_all()[0]
        for conversation in conversations:
            if conversation.id == id_or_name:
                return conversation
        named = [conversation for conversation in conversations if conversation.name == id_or_name]
        if not named:
            # names are compared exactly first so a user can tell "Notes" from "notes"; fall back to case-blind
            named = [conversation for conversation in conversations if conversation.name.casefold() == id_or_name.casefold()]
        if len(named) == 1:
            return named[0]
        if len(named) > 1:
            ids = ", ".join(conversation.id for conversation in named)
            raise StoreError(f"{len(named)} conversations are named {id_or_name!r} ({ids}); use the id instead.")
        started = [conversation for conversation in conversations
                   if len(id_or_name) >= MIN_ID_PREFIX and conversation.id.startswith(id_or_name)]
        if len(started) == 1:
            return started[0]
        if len(started) > 1:
            ids = ", ".join(conversation.id for conversation in started)
            raise StoreError(f"{len(started)} conversations have ids starting with {id_or_name!r} ({ids}); give more of the id.")
        raise SessionNotFound(f"No saved conversation with the id or name {id_or_name!r}. 'chatkv sessions list' shows them.")

    def delete(self, session_id: str) -> None:
        """Remove the conversation's file and its KV snapshot; ``SessionNotFound`` if neither existed."""
        removed = False
        for path in (self.session_file(session_id), self.snapshot_file(session_id)):
            try:
                path.unlink()
                removed = True
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise StoreError(f"Could not delete {path}: {describe_os_error(exc)}.") from exc
        if not removed:
            raise SessionNotFound(f"No saved conversation with id {session_id!r}.")

    # -- UI state ---------------------------------------------------------------------------------

    def load_state(self, messages: list[str] | None = None) -> dict[str, Any]:
        """Open tabs (ids, in order), the active tab and the theme; defaults if there is no usable file.

        A broken file is set aside and a message appended to ``messages`` when the caller passes a list.
        """
        state = {key: (list(value) if isinstance(value, list) else value) for key, value in DEFAULT_STATE.items()}
        path = self.paths.state_file
        try:
            stored = parse_json_object(read_capped(path, self.max_file_bytes))
            _check_state(stored)
        except FileNotFoundError:
            return state
        except UnreadableFile as exc:
            note = self._set_aside(path, exc.reason) + " Starting with no saved tabs or theme."
            if messages is not None:
                messages.append(note)
            return state
        state.update(stored)
        return state

    def save_state(self, state: dict[str, Any]) -> None:
        _check_state(state, for_saving=True)
        try:
            self._ensure_folders()
            write_bytes_atomic(self.paths.state_file, orjson.dumps(state))
        except OSError as exc:
            raise StoreError(f"Could not save the open tabs and theme: {describe_os_error(exc)} ({self.paths.state_file.parent}).") from exc

    # -- internals --------------------------------------------------------------------------------

    def _ensure_folders(self) -> None:
        # one call per level: ensure_private_dir makes only the last folder 0700, and parents it has to
        # create get the umask's mode, which would leave the data folder (state.json's home) readable
        ensure_private_dir(self.paths.data)
        ensure_private_dir(self.folder)

    def _read(self, path: Path) -> Conversation:
        session_id = path.name[: -len(SESSION_SUFFIX)]
        if not is_valid_session_id(session_id):
            raise UnreadableFile("its name is not a valid session id")
        record = parse_json_object(read_capped(path, self.max_file_bytes))
        try:
            conversation = Conversation.from_dict(record)
        except ValueError as exc:
            raise UnreadableFile(f"it is not a chatkv conversation ({exc})") from None
        # the id inside must be the file's name: otherwise the next save writes a second file, or
        # an id such as "../x" would be used as a path later on
        if conversation.id != session_id:
            raise UnreadableFile(f"the id inside ({conversation.id!r}) does not match the file name")
        return conversation

    def _set_aside(self, path: Path, reason: str) -> str:
        """Move an unusable file into the quarantine folder and return the message for the user."""
        try:
            ensure_private_dir(self.quarantine_folder)
            target = self._free_quarantine_name(path.name)
            os.replace(path, target)
        except FileNotFoundError:
            return f"{path} could not be used: {reason}. It has since disappeared."
        except OSError as exc:
            return f"{path} could not be used: {reason}. It could not be moved aside either ({exc.strerror}), so it stays where it is."
        return f"{path} could not be used: {reason}. It was moved to {target}."

    def _free_quarantine_name(self, name: str) -> Path:
        target = self.quarantine_folder / name
        if not target.exists():
            return target
        # an earlier broken copy of the same session is already there: keep both
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for attempt in range(1, 1000):
            target = self.quarantine_folder / f"{name}.{stamp}-{attempt}"
            if not target.exists():
                return target
        raise OSError(errno.EEXIST, "too many set-aside copies of this file")

    def _remove_stale_temp(self, path: Path) -> None:
        try:
            if time.time() - path.lstat().st_mtime > STALE_TEMP_SECONDS:
                path.unlink()
        except OSError:
            pass  # a leftover we cannot remove is harmless: it is never loaded


def _check_state(state: Any, for_saving: bool = False) -> None:
    """UnreadableFile (or ValueError when saving: a caller's bug) if the known keys have the wrong types."""
    def problem(reason: str) -> Exception:
        return ValueError(f"UI state: {reason}") if for_saving else UnreadableFile(reason)

    if not isinstance(state, dict):
        raise problem("it is not an object")
    tabs = state.get("open_tabs", [])
    if not isinstance(tabs, list) or not all(is_valid_session_id(tab) for tab in tabs):
        raise problem("open_tabs must be a list of session ids")
    active = state.get("active_tab")
    if active is not None and not is_valid_session_id(active):
        raise problem("active_tab must be a session id or null")
    theme = state.get("theme")
    if theme is not None and not isinstance(theme, str):
        raise problem("theme must be a string or null")
