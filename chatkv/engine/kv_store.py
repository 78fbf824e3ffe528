"""Paged KV storage: one pool of fixed-size blocks that every session's block table points into.

The pool is one tensor ``[layers, 2, blocks, kv_heads, block_size * head_dim]`` (K and V; how a block
arranges them is ``kv_blocks``'s business); slot ``b * block_size + i`` is position ``i`` of block ``b``.
A session holds a block table (block ids in position order) and the
exact token ids its first ``length`` positions hold. Blocks carry reference counts, so sessions share
them:

- a full block is named by a hash chain over token ids (its hash covers its own tokens and its
  predecessor's hash), so any prompt that starts with the same tokens finds the same blocks, whichever
  session computed them: shared system prompts, forks, repeated prompts in new sessions;
- the invariant that makes sharing safe: every block from position ``length`` on (the partly filled
  last block and the room reserved after it) is private (reference count 1) and has no hash. Anything
  that could break it (truncating into shared blocks, forking) copies the partial block first
  (copy on write).

Bytes are counted exactly from the pool: blocks that at least one session holds, times the bytes of
a block. The same budgets and LRU policy as ever apply (max sessions, tokens per session, bytes):
room is made by evicting least recently used idle sessions, which frees the blocks no one else holds.
A freed block keeps its hash until it is handed out again, so its prefix can still be found.

Sessions that a running turn uses are pinned: they are never evicted from under it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from chatkv.config import KvOptions
from chatkv.engine.kv_blocks import KvLayout, WriteRows, block_slots, key_pack, layer_caches, read_blocks, write_tokens

BLOCK_SIZE = 16  # tokens per block
POOL_GROWTH = 1.5  # the pool tensor grows by this much when no block is free (never past the byte budget)
MIN_POOL_BLOCKS = 64


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full
    token_ids: tuple[int, ...] = ()  # the tokens of a hashed block, to confirm a hash match
    owner: str | None = None  # the session that computed it


@dataclass
class SessionKv:
    session_id: str
    block_table: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    block_bytes: int = 0

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def nbytes(self) -> int:
        """Bytes of every block this session holds, shared ones included."""
        return len(self.block_table) * self.block_bytes


class KvBudgetError(Exception):
    """No room for a turn even after evicting every idle session."""


@dataclass
class EvictionCounters:
    sessions: int = 0
    tokens: int = 0
    bytes: int = 0


def chain_hash(previous: int | None, tokens: Sequence[int]) -> int:
    """The name of a full block: its tokens and the name of the block before it (deterministic across runs)."""
    return hash((previous, tuple(tokens)))


class KvStore:
    def __init__(
        self,
        layout: KvLayout,
        dtype: torch.dtype,
        device: torch.device,
        options: KvOptions,
        on_evict: Callable[[SessionKv], None] | None = None,
        block_size: int = BLOCK_SIZE,
    ) -> None:
        self.layout = layout
        self.dtype = dtype
        self.device = device
        self.options = options
        self.on_evict = on_evict
        self.block_size = block_size
        self.block_bytes = block_size * layout.bytes_per_token(dtype)
        self.max_blocks = options.max_bytes_total // self.block_bytes
        self.kv = torch.empty(layout.pool_shape(0, block_size), dtype=dtype, device=device)
        self.blocks: list[Block] = []
        self._free: OrderedDict[int, None] = OrderedDict()  # least recently freed first
        self._by_hash: dict[int, int] = {}
        self._entries: OrderedDict[str, SessionKv] = OrderedDict()
        self.pinned: set[str] = set()
        self.used_blocks = 0
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
    def bytes(self) -> int:
        """Bytes of KV held: blocks at least one session holds (each counted once)."""
        return self.used_blocks * self.block_bytes

    @property
    def tokens(self) -> int:
        return sum(entry.length for entry in self._entries.values())

    @property
    def shared_blocks(self) -> int:
        """Blocks held by more than one session."""
        return sum(1 for block in self.blocks if block.ref_count > 1)

    @property
    def shared_bytes_saved(self) -> int:
        """Bytes the sessions would hold on top of ``bytes`` if no block were shared."""
        return sum(block.ref_count - 1 for block in self.blocks if block.ref_count > 1) * self.block_bytes

    def sessions(self) -> list[SessionKv]:
        return list(self._entries.values())

    def bytes_for(self, tokens: int) -> int:
        """Bytes of the blocks that hold ``tokens`` tokens."""
        return _blocks_for(tokens, self.block_size) * self.block_bytes

    def slots(self, entry: SessionKv, start: int, stop: int) -> torch.Tensor:
        """Pool slots of the session's positions ``[start, stop)``: int64 ``[stop - start]``."""
        return block_slots(entry.block_table, start, stop, self.block_size)

    def session_kv(self, entry: SessionKv) -> torch.Tensor:
        """A copy of the session's KV as ``[layers, 2, kv_heads, length, head_dim]`` (the snapshot layout)."""
        blocks = torch.tensor(entry.block_table[: _blocks_for(entry.length, self.block_size)], dtype=torch.long)
        return read_blocks(self.kv, blocks.to(self.device), self.block_size, entry.length)

    def write(self, entry: SessionKv, start: int, kv: torch.Tensor) -> None:
        """Store ``kv`` (``[layers, 2, kv_heads, n, head_dim]``, any dtype or device) as the session's positions
        ``[start, start + n)``, in blocks it already holds (``reserve``); ``commit`` then records their tokens."""
        slots = self.slots(entry, start, start + kv.shape[3]).to(self.device)
        rows = WriteRows.for_slots(slots, self.layout.kv_heads, self.layout.head_dim, self.block_size, key_pack(self.dtype))
        kv = kv.to(device=self.device, dtype=self.dtype)
        for layer, (keys, values) in enumerate(layer_caches(self.kv, self.block_size)):
            write_tokens(keys, values, kv[layer, 0].transpose(0, 1), kv[layer, 1].transpose(0, 1), rows)

    def match_prefix(self, token_ids: Sequence[int], limit: int) -> list[int]:
        """Ids of pooled blocks holding the longest run of full blocks that starts ``token_ids[:limit]``."""
        matched: list[int] = []
        previous: int | None = None
        for start in range(0, limit - self.block_size + 1, self.block_size):
            tokens = tuple(token_ids[start : start + self.block_size])
            previous = chain_hash(previous, tokens)
            block_id = self._by_hash.get(previous)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            matched.append(block_id)
        return matched

    # changes -----------------------------------------------------------------------------------
    def attach(self, session_id: str, block_ids: list[int], token_ids: Sequence[int]) -> SessionKv:
        """Make the session hold exactly ``block_ids`` (full blocks found by ``match_prefix``) for ``token_ids``."""
        entry = self._entry_for(session_id)
        for block_id in block_ids:
            self._acquire(block_id)
        self._release_all(entry)
        entry.block_table = list(block_ids)
        entry.token_ids = list(token_ids)
        return entry

    def reserve(self, session_id: str, tokens_needed: int) -> SessionKv:
        """Make sure ``session_id`` has blocks for ``tokens_needed`` tokens, creating the session if needed.

        Evicts least recently used idle sessions to make room; raises KvBudgetError if it cannot.
        """
        entry = self._entry_for(session_id)
        missing = _blocks_for(tokens_needed, self.block_size) - len(entry.block_table)
        if missing > 0:
            self._make_room(missing, protect=session_id)
            entry.block_table.extend(self._allocate(session_id) for _ in range(missing))
        return entry

    def commit(self, session_id: str, tokens: Sequence[int], share: bool = True) -> None:
        """The K/V of ``tokens`` were written after the session's last position: record them, name full blocks."""
        entry = self._entries[session_id]
        before = entry.length
        entry.token_ids.extend(tokens)
        if share:
            self._name_full_blocks(entry, before)

    def truncate(self, session_id: str, length: int) -> None:
        """Forget everything after ``length`` tokens; cheap, and safe for blocks other sessions share."""
        entry = self._entries[session_id]
        old_length = entry.length
        if length >= old_length:
            return
        del entry.token_ids[length:]
        first = length // self.block_size
        for index in range(first, min(len(entry.block_table), _blocks_for(old_length, self.block_size))):
            block = self.blocks[entry.block_table[index]]
            if block.ref_count > 1:  # copy on write: keep the valid part, leave the shared block to the others
                self._make_room(1, protect=session_id)
                copy = self._allocate(session_id)
                if index == first and length % self.block_size:
                    self._copy_block(block.block_id, copy)
                self._release(block.block_id)
                entry.block_table[index] = copy
            else:
                self._forget_hash(block)

    def trim(self, session_id: str) -> None:
        """Give back the blocks reserved beyond the session's length (a turn ended before using them)."""
        entry = self._entries.get(session_id)
        if entry is None:
            return
        keep = _blocks_for(entry.length, self.block_size)
        for block_id in entry.block_table[keep:]:
            self._release(block_id)
        del entry.block_table[keep:]

    def fork(self, parent_id: str, child_id: str) -> int:
        """The child holds the parent's KV: full blocks by reference, the partial last block copied. Returns tokens."""
        parent = self._entries.get(parent_id)
        if parent is None or parent.length == 0 or child_id == parent_id:
            return 0
        self.drop(child_id)
        full = parent.length // self.block_size
        was_pinned = parent_id in self.pinned
        self.pinned.add(parent_id)  # making room for the child must not evict the parent
        try:
            entry = self.attach(child_id, parent.block_table[:full], parent.token_ids[: full * self.block_size])
            if parent.length % self.block_size:
                self._make_room(1, protect=child_id)
                copy = self._allocate(child_id)
                self._copy_block(parent.block_table[full], copy)
                self.blocks[copy].owner = parent_id
                entry.block_table.append(copy)
                entry.token_ids = list(parent.token_ids)
        finally:
            if not was_pinned:
                self.pinned.discard(parent_id)
        return entry.length

    def adopt(self, session_id: str, kv: torch.Tensor, token_ids: list[int], share: bool = True) -> SessionKv:
        """Install KV restored from disk (``[layers, 2, kv_heads, tokens, head_dim]``); its blocks join the pool.

        Full blocks the pool already holds are shared instead of copied.
        """
        self.drop(session_id)
        matched = self.match_prefix(token_ids, len(token_ids)) if share else []
        entry = self.attach(session_id, matched, token_ids[: len(matched) * self.block_size])
        start = entry.length
        try:
            self.reserve(session_id, len(token_ids))
        except KvBudgetError:
            self.drop(session_id)
            raise
        self.write(entry, start, kv[:, :, :, start:])
        self.commit(session_id, token_ids[start:], share)
        return entry

    def drop(self, session_id: str) -> int:
        """Forget the session; returns the bytes this freed (blocks no one else holds)."""
        entry = self._entries.pop(session_id, None)
        return self._release_all(entry) * self.block_bytes if entry is not None else 0

    def evict(self, session_id: str) -> None:
        entry = self._entries.get(session_id)
        if entry is None:
            return
        if self.on_evict is not None and entry.length:
            self.on_evict(entry)
        self.evictions.sessions += 1
        self.evictions.tokens += entry.length
        self.evictions.bytes += self.drop(session_id)

    # internals ---------------------------------------------------------------------------------
    def _entry_for(self, session_id: str) -> SessionKv:
        entry = self.get(session_id)
        if entry is None:
            while len(self._entries) >= self.options.max_sessions:
                if not self._evict_one(protect=session_id):
                    raise KvBudgetError(f"all {len(self._entries)} resident sessions are busy (max_sessions)")
            entry = SessionKv(session_id, block_bytes=self.block_bytes)
            self._entries[session_id] = entry
        return entry

    def _name_full_blocks(self, entry: SessionKv, before: int) -> None:
        size = self.block_size
        for index in range(before // size, entry.length // size):
            block = self.blocks[entry.block_table[index]]
            if block.hash is not None:
                continue
            previous = self.blocks[entry.block_table[index - 1]].hash if index else None
            if index and previous is None:
                return  # an unnamed predecessor cannot anchor a chain
            tokens = tuple(entry.token_ids[index * size : (index + 1) * size])
            block.hash = chain_hash(previous, tokens)
            block.token_ids = tokens
            self._by_hash.setdefault(block.hash, block.block_id)

    def _forget_hash(self, block: Block) -> None:
        if block.hash is not None and self._by_hash.get(block.hash) == block.block_id:
            del self._by_hash[block.hash]
        block.hash = None
        block.token_ids = ()

    def _copy_block(self, source: int, target: int) -> None:
        self.kv[:, :, target] = self.kv[:, :, source]

    def _allocate(self, owner: str) -> int:
        if not self._free:
            self._grow(len(self.blocks) + 1)
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        self._forget_hash(block)
        block.ref_count = 1
        block.owner = owner
        self._count_used(1)
        return block_id

    def _acquire(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:  # a freed block whose prefix was found again
            del self._free[block_id]
            self._count_used(1)
        block.ref_count += 1

    def _release(self, block_id: int) -> bool:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self._free[block_id] = None
            self._count_used(-1)
            return True
        return False

    def _release_all(self, entry: SessionKv) -> int:
        freed = sum(self._release(block_id) for block_id in entry.block_table)
        entry.block_table = []
        return freed

    def _count_used(self, delta: int) -> None:
        self.used_blocks += delta
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    def _grow(self, blocks_needed: int) -> None:
        old = len(self.blocks)
        new = min(self.max_blocks, max(blocks_needed, int(old * POOL_GROWTH), MIN_POOL_BLOCKS))
        if new < blocks_needed:
            raise KvBudgetError("the KV pool is full")
        # zeros, not empty: attention reads padding slots under a -inf mask, and garbage NaN there would leak
        kv = torch.zeros(self.layout.pool_shape(new, self.block_size), dtype=self.dtype, device=self.device)
        kv[:, :, :old] = self.kv
        self.kv = kv
        self.blocks.extend(Block(block_id) for block_id in range(old, new))
        fresh = OrderedDict((block_id, None) for block_id in range(old, new))
        fresh.update(self._free)  # fresh blocks first: freed ones keep their prefix findable longer
        self._free = fresh

    def _make_room(self, blocks: int, protect: str) -> None:
        budget = self.options.max_bytes_total
        new_bytes = blocks * self.block_bytes
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


def _blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)
