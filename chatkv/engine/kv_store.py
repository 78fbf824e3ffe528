"""Per-session KV storage under an LRU policy bounded by sessions, tokens per session and bytes.

Each resident session owns one tensor ``[layers, 2, kv_heads, capacity, head_dim]`` plus the exact
token ids its first ``length`` positions hold. Bytes are counted from the tensors actually held
(capacity, not just the used part), and an allocation happens only after room was made for it, so
the byte count never exceeds the budget, not even while a session's tensor is being grown.

Sessions that a running turn uses are pinned: they are never evicted from under it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch

from chatkv.config import KvOptions

CAPACITY_STEP = 128  # tokens; capacity is a multiple of this
GROWTH = 1.5  # a session that outgrows its tensor gets this much more room, so most turns copy nothing


@dataclass(frozen=True)
class KvLayout:
    layers: int
    kv_heads: int
    head_dim: int

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class SessionKv:
    session_id: str
    kv: torch.Tensor
    token_ids: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def capacity(self) -> int:
        return self.kv.shape[3]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def truncate(self, length: int) -> None:
        """Forget everything after ``length`` tokens (the data stays until overwritten)."""
        del self.token_ids[length:]

    def valid_kv(self) -> torch.Tensor:
        return self.kv[:, :, :, : self.length]


class KvBudgetError(Exception):
    """No room for a turn even after evicting every idle session."""


@dataclass
class EvictionCounters:
    sessions: int = 0
    tokens: int = 0
    bytes: int = 0


class KvStore:
    def __init__(
        self,
        layout: KvLayout,
        dtype: torch.dtype,
        device: torch.device,
        options: KvOptions,
        on_evict: Callable[[SessionKv], None] | None = None,
    ) -> None:
        self.layout = layout
        self.dtype = dtype
        self.device = device
        self.options = options
        self.on_evict = on_evict
        self._entries: OrderedDict[str, SessionKv] = OrderedDict()
        self.pinned: set[str] = set()
        self.bytes = 0
        self.peak_bytes = 0
        self.evictions = EvictionCounters()

    # queries -----------------------------------------------------------------------------------
    def __contains__(self, session_id: str) -> bool:
        return session_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, session_id: str) -> SessionKv | None:
        entry = self._entries.get(session_id)
        if entry is not None:
            self._entries.move_to_end(session_id)
        return entry

    def peek(self, session_id: str) -> SessionKv | None:
        """Like get, without counting as a use."""
        return self._entries.get(session_id)

    @property
    def tokens(self) -> int:
        return sum(entry.length for entry in self._entries.values())

    def sessions(self) -> list[SessionKv]:
        return list(self._entries.values())

    def bytes_for(self, capacity: int) -> int:
        return capacity * self.layout.bytes_per_token(self.dtype)

    # changes -----------------------------------------------------------------------------------
    def reserve(self, session_id: str, tokens_needed: int) -> SessionKv:
        """Make sure ``session_id`` can hold ``tokens_needed`` tokens, creating or growing its tensor.

        Evicts least recently used idle sessions to make room; raises KvBudgetError if it cannot.
        """
        entry = self.get(session_id)
        if entry is not None and entry.capacity >= tokens_needed:
            return entry
        wanted = max(tokens_needed, int(entry.capacity * GROWTH) if entry is not None else 0)
        # never beyond the per-session limit, unless this one turn needs more (its prompt was already fitted to it)
        capacity = min(_round_up(wanted, CAPACITY_STEP), max(tokens_needed, self.options.max_tokens_per_session))
        new_bytes = self.bytes_for(capacity)
        if entry is None:
            while len(self._entries) >= self.options.max_sessions:
                if not self._evict_one(protect=session_id):
                    raise KvBudgetError(f"all {len(self._entries)} resident sessions are busy (max_sessions)")
        self._make_room(new_bytes, protect=session_id)
        kv = torch.empty(
            (self.layout.layers, 2, self.layout.kv_heads, capacity, self.layout.head_dim), dtype=self.dtype, device=self.device
        )
        self._account(new_bytes)
        if entry is None:
            entry = SessionKv(session_id, kv)
            self._entries[session_id] = entry
        else:
            kv[:, :, :, : entry.length] = entry.valid_kv()
            self._account(-entry.nbytes)
            entry.kv = kv
        return entry

    def adopt(self, session_id: str, kv: torch.Tensor, token_ids: list[int], extra_tokens: int) -> SessionKv:
        """Install KV restored from disk, with room for ``extra_tokens`` more."""
        self.drop(session_id)
        entry = self.reserve(session_id, len(token_ids) + extra_tokens)
        entry.kv[:, :, :, : len(token_ids)] = kv.to(device=self.device, dtype=self.dtype)
        entry.token_ids = list(token_ids)
        return entry

    def drop(self, session_id: str) -> None:
        entry = self._entries.pop(session_id, None)
        if entry is not None:
            self._account(-entry.nbytes)

    def evict(self, session_id: str) -> None:
        entry = self._entries.get(session_id)
        if entry is None:
            return
        if self.on_evict is not None and entry.length:
            self.on_evict(entry)
        self.evictions.sessions += 1
        self.evictions.tokens += entry.length
        self.evictions.bytes += entry.nbytes
        self.drop(session_id)

    # internals ---------------------------------------------------------------------------------
    def _account(self, delta: int) -> None:
        self.bytes += delta
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    def _make_room(self, new_bytes: int, protect: str) -> None:
        budget = self.options.max_bytes_total
        if new_bytes > budget:
            raise KvBudgetError(
                f"one conversation needs {new_bytes / 2**20:.1f} MiB of KV but the whole budget is {budget / 2**20:.1f} MiB"
            )
        while self.bytes + new_bytes > budget:
            if not self._evict_one(protect):
                raise KvBudgetError("the KV budget is held by sessions that are generating right now")

    def _evict_one(self, protect: str) -> bool:
        for session_id in self._entries:  # oldest first
            if session_id != protect and session_id not in self.pinned:
                self.evict(session_id)
                return True
        return False


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step
