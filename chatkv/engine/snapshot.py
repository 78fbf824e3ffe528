"""KV snapshots on disk: one safetensors file per chat session, so a long chat reopens without re-reading its history.

A snapshot holds a session's KV, one tensor [num_layers, 2, num_kv_heads, tokens, head_dim] (0 = keys after
RoPE, 1 = values), and in the safetensors header everything needed to trust it: the format and its version,
the fingerprint of the model that computed it, the dtype and shape, the exact token ids it covers, and a
sha256 over all of that and the tensor bytes. load() checks every one of them and refuses anything that does
not match, saying why in one line, so the engine recomputes instead of attending over a wrong cache.

safetensors holds raw tensor bytes behind a JSON header; nothing here unpickles, ever.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import safetensors.torch
import torch
from safetensors import safe_open

from chatkv.atomic import write_bytes_atomic
from chatkv.model.loader import Fingerprint, dtype_name
from chatkv.paths import ensure_private_dir
from chatkv.session_id import is_valid_session_id

FORMAT_NAME = "chatkv-kv-snapshot"
FORMAT_VERSION = "1"
SUFFIX = ".safetensors"
TENSOR_NAME = "kv"

# The same rule as conversation ids: a plain file name, never a path, a dot file or a control character.
# A temp file this old belongs to no write in progress: its writer was killed before the rename.
_STALE_TEMP_SECONDS = 3600

_logger = logging.getLogger(__name__)


@dataclass
class Snapshot:
    token_ids: list[int]
    kv: torch.Tensor  # [num_layers, 2, num_kv_heads, len(token_ids), head_dim], contiguous, on CPU


class SnapshotError(Exception):
    """A snapshot was refused; the message says why."""


class _NoSnapshot(SnapshotError):
    """Nothing on disk for the session: the usual case for a new chat, not worth telling the user."""


class _SnapshotFile(NamedTuple):
    session_id: str
    path: Path
    size: int
    mtime_ns: int


def matches_prompt(snapshot: Snapshot, prompt_ids: list[int]) -> bool:
    """True when the snapshot covers a prefix of the prompt (or all of it), so its KV can be reused as is."""
    count = len(snapshot.token_ids)
    return count <= len(prompt_ids) and list(prompt_ids[:count]) == snapshot.token_ids



class SnapshotStore:
    """The KV snapshots of one running model, one file per session, kept under a byte budget.

    When a save would go over the budget, the least recently used other snapshots (by file mtime, which
    load() touches) are deleted first. The budget counts finished snapshots; a write briefly needs room
    for one more copy of the file it replaces.
    """

    def __init__(
        self,
        folder: Path,
        fingerprint: Fingerprint,
        max_disk_bytes: int,
        log: Callable[[str], None] = _logger.warning,
    ) -> None:
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.max_disk_bytes = int(max_disk_bytes)
        self._log = log
        self._last_errors: dict[str, str] = {}
        # The header (checksum aside) each session's file is known to hold, written or verified by this
        # store, so saving an unchanged snapshot again skips the write.
        self._known_headers: dict[str, str] = {}
        # Sessions already told their snapshot exceeds the budget: a long chat saves after every turn.
        self._told_too_large: set[str] = set()
        # The engine saves and loads while others may ask for sizes; an eviction must not race a load.
        self._lock = threading.RLock()
        self._remove_stale_temp_files()

    # ---- writing -------------------------------------------------------------------------------

    def save(self, session_id: str, kv: torch.Tensor, token_ids: list[int]) -> int:
        """Write the session's snapshot; return the bytes written (0 when skipped, refused or failed).

        ``kv`` may be a non-contiguous [.., len(token_ids), ..] slice of a larger cache. Raises
        SnapshotError for an invalid session id or a kv that does not fit the token ids.
        """
        path = self._path_for(session_id)
        _check_kv_fits_tokens(kv, token_ids)
        if not token_ids or self.max_disk_bytes <= 0:
            return 0  # nothing worth keeping, or snapshots are turned off
        kv = kv.detach().to("cpu").contiguous()
        header = _build_header(self.fingerprint, kv, token_ids)
        header_key = _header_key(header)
        with self._lock:
            if self._known_headers.get(session_id) == header_key and path.is_file():
                _touch(path)
                return 0
            header["checksum"] = _checksum(header, kv)
            data = safetensors.torch.save({TENSOR_NAME: kv}, metadata=header)
            if len(data) > self.max_disk_bytes:
                if session_id not in self._told_too_large:
                    self._told_too_large.add(session_id)
                    self._log(
                        f"snapshot for session {session_id} not saved: its {len(data):,} bytes exceed the whole "
                        f"snapshot budget of {self.max_disk_bytes:,} bytes"
                    )
                return 0
            try:
                ensure_private_dir(self.folder)
                self._evict_lru_to_fit(len(data), keep=session_id)
                write_bytes_atomic(path, data)
            except OSError as exc:
                self._known_headers.pop(session_id, None)
                self._log(f"snapshot for session {session_id} not saved: {exc}")
                return 0
            self._known_headers[session_id] = header_key
            return len(data)

    def delete(self, session_id: str) -> None:
        path = self._path_for(session_id)
        with self._lock:
            self._known_headers.pop(session_id, None)
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                self._log(f"snapshot for session {session_id} could not be deleted: {exc}")

    # ---- reading -------------------------------------------------------------------------------

    def load(
        self, session_id: str, expected_layout: tuple[int, int, int], dtype: torch.dtype
    ) -> Snapshot | None:
        """The session's snapshot if it is sound and fits the running model, else None (never raises).

        ``expected_layout`` is (num_layers, num_kv_heads, head_dim). A refusal is logged in one line and
        kept for last_error(); a missing file is only recorded.
        """
        with self._lock:
            # Whatever this store believed the file held no longer counts: if it is refused, the next save
            # of the same tokens must rewrite it rather than skip.
            self._known_headers.pop(session_id, None)
            try:
                path = self._path_for(session_id)
                snapshot, header_key = self._read_verified(path, expected_layout, dtype)
            except _NoSnapshot as exc:
                self._last_errors[session_id] = str(exc)
                return None
            except SnapshotError as exc:
                self._refuse(session_id, str(exc))
                return None
            except Exception as exc:  # whatever a damaged file provokes, recomputing is always possible
                self._refuse(session_id, f"it could not be read ({type(exc).__name__}: {exc})")
                return None
            _touch(path)  # the LRU clock: a snapshot just used is the last to go
            self._known_headers[session_id] = header_key
            self._last_errors.pop(session_id, None)
            return snapshot

    def last_error(self, session_id: str) -> str | None:
        """Why the last load of this session returned None; None after a successful load."""
        return self._last_errors.get(session_id)

    def has(self, session_id: str) -> bool:
        """Whether a snapshot file exists; only load() says whether it can be used."""
        return self._path_for(session_id).is_file()

    def session_bytes(self, session_id: str) -> int:
        try:
            return self._path_for(session_id).stat().st_size
        except FileNotFoundError:
            return 0

    def disk_bytes(self) -> int:
        return sum(entry.size for entry in self._snapshot_files())

    # ---- internals -----------------------------------------------------------------------------

    def _path_for(self, session_id: str) -> Path:
        if not is_valid_session_id(session_id):
            raise SnapshotError(f"{session_id!r} is not a valid session id")
        return self.folder / f"{session_id}{SUFFIX}"

    def _refuse(self, session_id: str, reason: str) -> None:
        self._last_errors[session_id] = reason
        shown = session_id if is_valid_session_id(session_id) else repr(session_id)
        self._log(f"snapshot for session {shown} ignored: {reason}; recomputing")

    def _read_verified(
        self, path: Path, expected_layout: tuple[int, int, int], dtype: torch.dtype
    ) -> tuple[Snapshot, str]:
        try:
            handle = safe_open(str(path), framework="pt")
        except FileNotFoundError:
            raise _NoSnapshot("there is no snapshot on disk") from None
        except Exception as exc:
            raise SnapshotError(f"it is not a readable safetensors file ({exc})") from None
        with handle as reader:
            header = reader.metadata() or {}
            # Cheap header checks first: a snapshot of another model is refused without reading its tensor.
            _check_format(header)
            _check_fingerprint(header, self.fingerprint)
            _check_dtype(header, dtype)
            if list(reader.keys()) != [TENSOR_NAME]:
                raise SnapshotError(f"it holds tensors {sorted(reader.keys())}, not one named {TENSOR_NAME!r}")
            shape = _parse_shape(_field(header, "kv_shape"))
            if list(reader.get_slice(TENSOR_NAME).get_shape()) != shape:
                raise SnapshotError("its tensor shape differs from the shape its header records")
            _check_layout(shape, expected_layout)
            token_count = _parse_count(_field(header, "token_count"))
            if token_count != shape[3]:
                raise SnapshotError(f"its header says {token_count} tokens but the KV holds {shape[3]}")
            token_ids = _decode_token_ids(_field(header, "token_ids"), token_count)
            kv = reader.get_tensor(TENSOR_NAME)
        if kv.dtype != dtype:
            raise SnapshotError(f"its tensor is {dtype_name(kv.dtype)}, not the {dtype_name(dtype)} its header records")
        unchecked = {key: value for key, value in header.items() if key != "checksum"}
        if _field(header, "checksum") != _checksum(unchecked, kv):
            raise SnapshotError("its checksum does not match its contents (the file is damaged)")
        return Snapshot(token_ids=token_ids, kv=kv), _header_key(unchecked)

    def _snapshot_files(self) -> list[_SnapshotFile]:
        found = []
        try:
            entries = list(os.scandir(self.folder))
        except (FileNotFoundError, NotADirectoryError):
            return []
        for entry in entries:
            session_id = entry.name.removesuffix(SUFFIX)
            if not entry.name.endswith(SUFFIX) or not is_valid_session_id(session_id):
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # deleted while we looked
            found.append(_SnapshotFile(session_id, Path(entry.path), info.st_size, info.st_mtime_ns))
        return found

    def _evict_lru_to_fit(self, incoming_bytes: int, keep: str) -> None:
        """Delete the least recently used snapshots, other than ``keep``'s, until ``incoming_bytes`` fit."""
        others = sorted(
            (entry for entry in self._snapshot_files() if entry.session_id != keep),
            key=lambda entry: (entry.mtime_ns, entry.session_id),
        )
        total = sum(entry.size for entry in others)
        for oldest in others:
            if total + incoming_bytes <= self.max_disk_bytes:
                break
            oldest.path.unlink(missing_ok=True)
            self._known_headers.pop(oldest.session_id, None)
            total -= oldest.size

    def _remove_stale_temp_files(self) -> None:
        # write_bytes_atomic names its temp files ".<name>.<random>.tmp"; a killed writer leaves one behind,
        # and nothing else would ever count or delete it.
        try:
            entries = list(os.scandir(self.folder))
        except (FileNotFoundError, NotADirectoryError):
            return
        cutoff = time.time() - _STALE_TEMP_SECONDS
        for entry in entries:
            name = entry.name
            if not (name.startswith(".") and name.endswith(".tmp") and f"{SUFFIX}." in name):
                continue
            try:
                if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
            except OSError:
                pass  # someone else's file or already gone; it only costs disk space


# ---- the header ----------------------------------------------------------------------------------


def _build_header(fingerprint: Fingerprint, kv: torch.Tensor, token_ids: list[int]) -> dict[str, str]:
    """Every header field except the checksum, which covers these."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model_id": fingerprint.model_id,
        "model_config_hash": fingerprint.config_hash,
        "model_dtype": fingerprint.dtype,
        "kv_dtype": dtype_name(kv.dtype),
        "kv_shape": ",".join(str(size) for size in kv.shape),
        "token_count": str(len(token_ids)),
        "token_ids": _encode_token_ids(token_ids),
    }


def _checksum(header_without_checksum: dict[str, str], kv: torch.Tensor) -> str:
    """sha256 over every other header field (token ids, shape, fingerprint...) and the KV bytes."""
    digest = hashlib.sha256()
    digest.update(json.dumps(header_without_checksum, sort_keys=True).encode())
    digest.update(_tensor_bytes(kv))
    return f"sha256:{digest.hexdigest()}"


def _header_key(header_without_checksum: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(header_without_checksum, sort_keys=True).encode()).hexdigest()


def _tensor_bytes(kv: torch.Tensor) -> memoryview:
    # Viewed as bytes without a copy; bf16 has no numpy dtype, uint8 does.
    return memoryview(kv.contiguous().reshape(-1).view(torch.uint8).numpy())


def _encode_token_ids(token_ids: list[int]) -> str:
    """Base64 of little-endian uint32: about 5.3 header bytes per token, against ~7 for a JSON list."""
    try:
        packed = struct.pack(f"<{len(token_ids)}I", *token_ids)
    except struct.error as exc:
        raise SnapshotError(f"token ids must be integers in [0, 2**32): {exc}") from None
    return base64.b64encode(packed).decode("ascii")


def _decode_token_ids(text: str, count: int) -> list[int]:
    try:
        packed = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SnapshotError("its token ids are not valid base64") from None
    if len(packed) != 4 * count:
        raise SnapshotError(f"its header says {count} tokens but lists {len(packed) / 4:g} token ids")
    return list(struct.unpack(f"<{count}I", packed))


def _field(header: dict[str, str], name: str) -> str:
    try:
        return header[name]
    except KeyError:
        raise SnapshotError(f"its header has no {name!r} field") from None


def _parse_count(text: str) -> int:
    if not text.isdigit():
        raise SnapshotError(f"its token count {text!r} is not a number")
    return int(text)


def _parse_shape(text: str) -> list[int]:
    parts = text.split(",")
    if len(parts) != 5 or not all(part.isdigit() for part in parts):
        raise SnapshotError(f"its KV shape {text!r} is not five sizes")
    return [int(part) for part in parts]


def _check_format(header: dict[str, str]) -> None:
    if header.get("format") != FORMAT_NAME:
        raise SnapshotError("it is a safetensors file but not a chatkv KV snapshot")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise SnapshotError(f"it has format version {version!r}; this chatkv reads version {FORMAT_VERSION}")


def _check_fingerprint(header: dict[str, str], running: Fingerprint) -> None:
    made_with = Fingerprint(
        _field(header, "model_id"), _field(header, "model_config_hash"), _field(header, "model_dtype")
    )
    if (made_with.model_id, made_with.config_hash) != (running.model_id, running.config_hash):
        raise SnapshotError(
            f"it was made with a different model ({made_with.model_id}, config {made_with.config_hash}) "
            f"than the one running ({running.model_id}, config {running.config_hash})"
        )
    if made_with.dtype != running.dtype:
        raise SnapshotError(f"it was made with the model in {made_with.dtype}; it now runs in {running.dtype}")


def _check_dtype(header: dict[str, str], dtype: torch.dtype) -> None:
    stored = _field(header, "kv_dtype")
    if stored != dtype_name(dtype):
        raise SnapshotError(f"it holds {stored} KV, not the {dtype_name(dtype)} asked for")


def _check_layout(shape: list[int], expected_layout: tuple[int, int, int]) -> None:
    layers, pair, kv_heads, _tokens, head_dim = shape
    if pair != 2 or (layers, kv_heads, head_dim) != tuple(expected_layout):
        raise SnapshotError(
            f"its KV layout (layers, kv heads, head dim) = ({layers}, {kv_heads}, {head_dim}) does not match "
            f"the model's {tuple(expected_layout)}"
        )


def _check_kv_fits_tokens(kv: torch.Tensor, token_ids: list[int]) -> None:
    if kv.dim() != 5 or kv.shape[1] != 2:
        raise SnapshotError(f"KV must be [layers, 2, kv heads, tokens, head dim], got {list(kv.shape)}")
    if kv.shape[3] != len(token_ids):
        raise SnapshotError(f"KV covers {kv.shape[3]} tokens but {len(token_ids)} token ids were given")


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass  # only the LRU order suffers
