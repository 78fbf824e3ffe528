"""The engine: one background thread owns the model and serves every chat session.

In ``chatkv launch`` it runs in a child process of its own (``chatkv.engine.process``), behind an
``EngineProcess`` in the app's process; the bench and the tests call it directly. Callers submit a
turn for a session and get a ``TurnHandle``
that streams tokens and ends with a ``TurnResult``. The thread loops: admit waiting turns (reusing
each session's cached KV up to the longest common prefix with its new prompt), run one packed
forward pass for everything scheduled, sample, stream, finish what is done.

A failure while serving one session fails that turn with a message; the thread and the other
sessions carry on.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Callable, Sequence

from chatkv.config import Settings
from chatkv.conversation import Message
from chatkv.engine.api import (
    BackendCapabilities,
    EngineError,
    check_session_id,
    check_turn_request,
    EngineStats,
    FinishReason,
    Sampling,
    SessionStats,
    TokenEvent,
    TurnHandle,
    TurnResult,
)
from chatkv.engine.attention import Segment
from chatkv.engine.detokenizer import IncrementalDetokenizer
from chatkv.engine.kv_store import KvBudgetError, KvStore, SessionKv
from chatkv.engine.metrics import EngineMetrics
from chatkv.engine.prompt import ChatRenderer
from chatkv.engine.runner import ModelRunner
from chatkv.engine.sampler import make_generator, next_token, recent_ids
from chatkv.engine.scheduler import PlannedSegment, Scheduler
from chatkv.engine.snapshot import SnapshotStore, matches_prompt
from chatkv.engine.threads import engine_threads
from chatkv.engine.turn import Turn, TurnState
from chatkv.model.loader import ModelBundle


def eos_token_ids(bundle: ModelBundle) -> set[int]:
    ids: set[int] = set()
    configured = getattr(bundle.model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if bundle.tokenizer.eos_token_id is not None:
        ids.add(bundle.tokenizer.eos_token_id)
    return ids


def common_prefix_length(a: Sequence, b: Sequence) -> int:
    limit = min(len(a), len(b))
    for index in range(limit):
        if a[index] != b[index]:
            return index
    return limit


class Engine:
    """The ``Backend`` (``chatkv.engine.api``) that owns the model: see the module docstring."""

    capabilities = BackendCapabilities()

    def __init__(
        self,
        bundle: ModelBundle,
        settings: Settings | None = None,
        snapshot_dir: Path | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.bundle = bundle
        self.settings = settings or Settings()
        self.kv_options = self.settings.kv
        self._log = log or (lambda message: None)
        self.tokenizer = bundle.tokenizer
        self.eos_ids = eos_token_ids(bundle)
        self.renderer = ChatRenderer(bundle.tokenizer, self.eos_ids)
        self.runner = ModelRunner(bundle, progress=self._log)
        if self.runner.decode_kernel is None and bundle.device.type == "cpu":
            self._log(f"attention runs on plain torch operations (same replies, slower with many tabs): "
                      f"{self.runner.decode_kernel_missing}")
        self._sharing = self.kv_options.enabled and self.kv_options.share_prefixes
        self.threads = engine_threads(self.settings.model.threads)
        self.context_limit = min(self.kv_options.max_tokens_per_session, bundle.max_context)
        self.snapshots = self._open_snapshots(snapshot_dir)
        self.store = KvStore(
            self.runner.layout, bundle.dtype, bundle.device, self.kv_options, on_evict=self._spill_to_disk
        )
        self.scheduler = Scheduler(self.settings.batching, self.settings.speculative.draft_tokens)
        self.metrics = EngineMetrics()
        # one lock guards the scheduler, the store and the metrics; the engine thread releases it
        # only while the model computes, so stats() and submit() never wait for a forward pass
        self._lock = threading.RLock()
        self._wakeup = threading.Condition(self._lock)
        self._calls: list[tuple[Callable[[], object], Future]] = []
        self._stopping = False
        self._crashed: str | None = None
        self._thread: threading.Thread | None = None
        self.fault_hook: Callable[[str], None] | None = None  # tests inject per-session failures here
        # child session -> (parent session, tokens shared by fork_kv): the child's first turn reports them as shared
        self._forked_from: dict[str, tuple[str, int]] = {}
        # how many old messages each session's last turn left out to fit the context: they stay out while the rest
        # fits, so the next prompt starts with what the session's KV holds (ChatRenderer.fit)
        self._dropped: dict[str, int] = {}

    # lifecycle ---------------------------------------------------------------------------------
    def _open_snapshots(self, snapshot_dir: Path | None):
        if snapshot_dir is None or not self.settings.snapshot.enabled:
            return None
        return SnapshotStore(snapshot_dir, self.bundle.fingerprint, self.settings.snapshot.max_disk_bytes, log=self._log)

    @property
    def fingerprint(self):
        return self.bundle.fingerprint

    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="chatkv-engine", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()

    # public API --------------------------------------------------------------------------------
    def submit(self, session_id: str, messages: list[Message], sampling: Sampling | None = None,
               listener: Callable[[TokenEvent | TurnResult], None] | None = None) -> TurnHandle:
        """Queue a turn: ``messages`` is the whole conversation ending with the new user message.

        ``listener`` is called on the engine thread with each token event and then the result (see ``TurnHandle``).
        """
        sampling = check_turn_request(session_id, messages, sampling)
        reserve = min(sampling.max_new_tokens, self.context_limit // 2)
        rendered = self.renderer.fit(messages, self.context_limit - reserve, self._dropped.get(session_id, 0))
        handle = TurnHandle.for_caller(session_id, listener)
        turn = Turn(session_id, rendered.ids, sampling, handle, dropped_messages=rendered.dropped_messages)
        with self._wakeup:
            if self._stopping:
                raise EngineError("the engine is shutting down")
            if self._crashed:
                raise EngineError(self._crashed)
            try:
                self.scheduler.enqueue(turn)
            except EngineError:
                self.metrics.rejected_requests += 1
                raise
            self._dropped[session_id] = rendered.dropped_messages
            self._wakeup.notify_all()
        return handle

    async def until_ready(self) -> None:
        """Running from the start: nothing to wait for."""

    def cancel(self, session_id: str) -> bool:
        """Stop the session's turn: a waiting one ends at once, a running one at the next step, keeping its text."""
        with self._wakeup:
            found = False
            for turn in list(self.scheduler.waiting):
                if turn.session_id == session_id:
                    self.scheduler.remove(turn)
                    self._finish(turn, "cancelled")
                    found = True
            for turn in self.scheduler.running:
                if turn.session_id == session_id:
                    turn.cancel_requested = True
                    found = True
            self._wakeup.notify_all()
            return found

    def forget(self, session_id: str) -> None:
        """The session is gone (tab deleted): cancel its turn and drop its KV, in memory and on disk."""
        self.cancel(session_id)
        self.call_in_engine(lambda: self._forget_now(session_id)).result()

    def snapshot(self, session_ids: list[str] | None = None) -> int:
        """Write the KV of resident sessions to disk; returns how many were written."""
        if self.snapshots is None:
            return 0
        return self.call_in_engine(lambda: self._snapshot_now(session_ids)).result()

    def stats(self) -> EngineStats:
        with self._lock:
            decode_rate, prefill_rate = self.metrics.rates()
            metrics = self.metrics
            return EngineStats(
                sessions=len(self.store),
                tokens=self.store.tokens,
                bytes=self.store.bytes,
                used_bytes=self.store.bytes_for(self.store.tokens),
                peak_bytes=self.store.peak_bytes,
                budget_bytes=self.kv_options.max_bytes_total,
                evictions=self.store.evictions.sessions,
                evicted_tokens=self.store.evictions.tokens,
                evicted_bytes=self.store.evictions.bytes,
                prompt_tokens=metrics.prompt_tokens,
                reused_tokens=metrics.reused_tokens,
                reused_tokens_same_session=metrics.reused_tokens - metrics.shared_tokens,
                reused_tokens_other_session=metrics.shared_tokens,
                shared_blocks=self.store.shared_blocks,
                shared_bytes_saved=self.store.shared_bytes_saved,
                hit_rate=metrics.hit_rate,
                hit_rate_window=metrics.hit_rate_window,
                turns=metrics.turns,
                turn_hits=metrics.turn_hits,
                disk_restores=metrics.disk_restores,
                disk_reused_tokens=metrics.disk_reused_tokens,
                disk_bytes=self.snapshots.disk_bytes() if self.snapshots else 0,
                disk_budget_bytes=self.settings.snapshot.max_disk_bytes if self.snapshots else 0,
                forward_passes=metrics.forward_passes,
                avg_batch_size=metrics.avg_batch_size,
                avg_batch_wait_ms=metrics.avg_batch_wait_ms,
                avg_queue_depth=metrics.avg_queue_depth,
                queue_depth=len(self.scheduler.waiting),
                active_turns=len(self.scheduler.running),
                rejected_requests=metrics.rejected_requests,
                decode_tok_s=decode_rate,
                prefill_tok_s=prefill_rate,
                decode_tok_s_history=list(metrics.decode_history),
                last_ttft_ms=metrics.last_ttft_ms,
                generated_tokens=metrics.generated_tokens,
                prefilled_tokens=metrics.prefilled_tokens,
                threads=self.threads,
                draft_tokens=self.settings.speculative.draft_tokens,
                drafted_tokens=metrics.drafted_tokens,
                accepted_draft_tokens=metrics.accepted_draft_tokens,
                draft_acceptance_rate=metrics.draft_acceptance_rate,
                weights=self.bundle.fingerprint.dtype,
            )

    def session_stats(self, session_id: str) -> SessionStats:
        with self._lock:
            entry = self.store.peek(session_id)
            on_disk = self.snapshots.session_bytes(session_id) if self.snapshots else 0
            if entry is None:
                return SessionStats(session_id, 0, 0, resident=False, on_disk_bytes=on_disk)
            return SessionStats(session_id, entry.length, entry.nbytes, resident=True, on_disk_bytes=on_disk)

    def fork_kv(self, parent_session_id: str, child_session_id: str) -> int:
        """The child session shares the parent's resident KV: full blocks by reference, the partial last block copied.

        Returns the tokens shared (0 if the parent has nothing resident, caching is off, or no room could be
        made: the child's first turn then recomputes its prompt). The child's first turn reports the reuse
        of those tokens as shared with the parent (``TurnResult.shared_tokens``/``shared_from``).
        Raises ``EngineError`` for an unsafe session id.
        """
        for session_id in (parent_session_id, child_session_id):
            check_session_id(session_id)

        def fork() -> int:
            with self._lock:
                self._forked_from.pop(child_session_id, None)
                if not self.kv_options.enabled:
                    return 0
                try:
                    tokens = self.store.fork(parent_session_id, child_session_id)
                except KvBudgetError:
                    self.store.drop(child_session_id)
                    return 0
                if tokens:
                    self._forked_from[child_session_id] = (parent_session_id, tokens)
                return tokens

        return self.call_in_engine(fork).result()

    def call_in_engine(self, function: Callable[[], object]) -> Future:
        """Run ``function`` on the engine thread between two steps (or right here if the thread is not running)."""
        future: Future = Future()
        with self._wakeup:
            if self._thread is None or not self._thread.is_alive():
                future.set_result(function())
                return future
            self._calls.append((function, future))
            self._wakeup.notify_all()
        return future

    # the engine thread -------------------------------------------------------------------------
    def _serve(self) -> None:
        import torch

        torch.set_num_threads(self.threads)  # the thread that calls into torch owns its OpenMP pool
        try:
            self._serve_until_stopped()
        except BaseException as exc:  # a bug in the engine itself: fail every turn instead of hanging them
            with self._wakeup:
                self._crashed = f"the engine stopped after an internal error: {exc!r}"
                for turn in list(self.scheduler.waiting) + list(self.scheduler.running):
                    self._finish(turn, "error", self._crashed)
                self._run_calls()
            self._log(self._crashed)

    def _serve_until_stopped(self) -> None:
        while True:
            with self._wakeup:
                while not self._stopping and not self._calls and not self.scheduler.has_work():
                    self._wakeup.wait(timeout=0.5)
                    self.metrics.sample_history()
                if self._stopping:
                    self._cancel_everything()
                    self._run_calls()
                    return
            self._step()

    def drain(self) -> None:
        """Serve every submitted turn to the end on the calling thread (the engine must not be started).

        For callers that want all of the process's torch work on one thread, as the bench does: torch's
        OpenMP workers belong to the thread that calls into torch, and on a small machine a second set
        slows both (their idle workers stop spinning), so a bench running baselines on its main thread and
        the engine on another would understate both.
        """
        if self._thread is not None:
            raise RuntimeError("drain() is for an engine that was not started")
        import torch

        torch.set_num_threads(self.threads)
        while self.scheduler.has_work():
            self._step()

    def _step(self) -> None:
        """One round: run queued calls, apply cancellations, admit waiting turns, one forward pass."""
        with self._wakeup:
            self.metrics.sample_history()  # the sparkline moves while replies stream, not only between them
            self._run_calls()
            self._apply_cancellations()
            delay = self.scheduler.batch_wait_remaining(time.perf_counter())
            if delay > 0:
                self._wakeup.wait(timeout=delay)  # a lone turn waits briefly for company (max_batch_wait_ms)
                return
            for turn in self.scheduler.take_admissions():
                try:
                    self._admit(turn)
                except Exception as exc:  # noqa: BLE001 - one bad turn must not stop the engine
                    self.store.pinned.discard(turn.session_id)
                    self._finish(turn, "error", f"Could not start this turn: {exc}")
            plan = self.scheduler.plan_step()
        if plan:
            self._run_step(plan)

    def _run_calls(self) -> None:
        calls, self._calls = self._calls, []
        for function, future in calls:
            try:
                future.set_result(function())
            except Exception as exc:  # handed to the caller, who waits on the future
                future.set_exception(exc)

    def _apply_cancellations(self) -> None:
        for turn in list(self.scheduler.running):
            if turn.cancel_requested:
                self._finish(turn, "cancelled")

    def _cancel_everything(self) -> None:
        for turn in list(self.scheduler.waiting) + list(self.scheduler.running):
            self._finish(turn, "cancelled")

    # admission ---------------------------------------------------------------------------------
    def _admit(self, turn: Turn) -> None:
        """Find the session's cached KV (memory, else disk), keep its common prefix with the prompt, reserve room."""
        session_id = turn.session_id
        entry, reused_from = self._cached_kv(turn)
        reusable = turn.prompt_tokens - 1  # always prefill at least one token, so the step has logits to sample from
        reused = 0
        if entry is not None:
            reused = min(common_prefix_length(entry.token_ids, turn.prompt_ids), reusable)
        shared = self.store.match_prefix(turn.prompt_ids, reusable) if self._sharing else []
        if len(shared) * self.store.block_size > reused:
            # blocks in the pool (another session's, or this one's own before it was evicted) cover more
            donors = {self.store.blocks[block_id].owner for block_id in shared} - {session_id}
            turn.shared_tokens = sum(
                self.store.block_size for block_id in shared if self.store.blocks[block_id].owner != session_id
            )
            turn.shared_from = donors.pop() if len(donors) == 1 else None
            reused = len(shared) * self.store.block_size
            entry = self.store.attach(session_id, shared, turn.prompt_ids[:reused])
            reused_from = "memory"
        elif entry is not None:
            self.store.truncate(session_id, reused)
        turn.max_new_tokens = max(1, min(turn.sampling.max_new_tokens, self.context_limit - turn.prompt_tokens))
        try:
            self.store.reserve(session_id, turn.prompt_tokens + turn.max_new_tokens)
        except KvBudgetError as exc:
            if self.scheduler.running:
                self.scheduler.requeue_front(turn)  # a running turn will free memory when it ends
                return
            self.store.drop(session_id)
            self._finish(turn, "error", f"Not enough KV memory for this turn: {exc}. Raise max_bytes_total.")
            return
        self.store.pinned.add(session_id)
        turn.reused_tokens = reused
        turn.reused_from = reused_from if reused else "none"
        fork = self._forked_from.pop(session_id, None)
        if fork is not None and reused_from == "memory" and min(reused, fork[1]) > turn.shared_tokens:
            # a fork's first turn: the tokens fork_kv gave it were computed by the parent
            turn.shared_from, turn.shared_tokens = fork[0], min(reused, fork[1])
        turn.prefill_position = reused
        turn.generator = make_generator(turn.sampling)
        turn.detokenizer = IncrementalDetokenizer(self.tokenizer)
        turn.admitted_at = time.perf_counter()
        turn.state = TurnState.PREFILLING
        self.scheduler.running.append(turn)
        self.metrics.record_admission(turn.admitted_at - turn.submitted_at)

    def _cached_kv(self, turn: Turn) -> tuple[SessionKv | None, str]:
        if not self.kv_options.enabled:
            self.store.drop(turn.session_id)
            return None, "none"
        entry = self.store.get(turn.session_id)
        if entry is not None:
            return entry, "memory"
        if self.snapshots is None:
            return None, "none"
        snapshot = self.snapshots.load(
            turn.session_id, (self.runner.layout.layers, self.runner.layout.kv_heads, self.runner.layout.head_dim),
            self.bundle.dtype,
        )
        if snapshot is None:
            return None, "none"
        if not matches_prompt(snapshot, turn.prompt_ids):
            self._log(f"snapshot for session {turn.session_id} ignored: its tokens do not match the conversation; recomputing")
            return None, "none"
        try:
            entry = self.store.adopt(turn.session_id, snapshot.kv, snapshot.token_ids, share=self._sharing)
        except KvBudgetError:
            return None, "none"
        return entry, "disk"

    # one step ----------------------------------------------------------------------------------
    def _run_step(self, plan: list[PlannedSegment]) -> None:
        try:
            logits, seconds = self._forward(plan)
        except Exception as exc:  # noqa: BLE001 - isolate the failing session below
            if len(plan) == 1:
                with self._lock:
                    self._finish(plan[0].turn, "error", f"The model failed on this turn: {exc}")
                return
            # run each session alone: the ones that fail again are failed, the rest carry on
            for segment in plan:
                self._run_step([segment])
            return
        prefill_tokens = sum(len(p.tokens) for p in plan if p.turn.state is TurnState.PREFILLING)
        fed = sum(len(p.tokens) for p in plan)
        with self._lock:
            decoded = self._after_forward(plan, logits)
            self.metrics.record_step(len(plan), prefill_tokens, fed - prefill_tokens, seconds,
                                     len(self.scheduler.waiting), decode_generated=decoded)

    def _forward(self, plan: list[PlannedSegment]):
        """The step's logits (rows in plan order) and the seconds the forward took."""
        input_ids: list[int] = []
        positions: list[int] = []
        segments: list[Segment] = []
        logits_rows: list[int] = []
        for planned in plan:
            if self.fault_hook is not None:
                self.fault_hook(planned.turn.session_id)
            entry = self.store.peek(planned.turn.session_id)
            past = entry.length
            segments.append(Segment(entry.block_table, start=len(input_ids), length=len(planned.tokens), past=past,
                                    decode=bool(planned.draft)))
            input_ids.extend(planned.tokens)
            positions.extend(range(past, past + len(planned.tokens)))
            logits_rows.extend(range(len(input_ids) - planned.logits_rows, len(input_ids)))
        started = time.perf_counter()
        logits = self.runner.forward(input_ids, positions, segments, logits_rows, kv=self.store.kv)
        return logits, time.perf_counter() - started

    def _after_forward(self, plan: list[PlannedSegment], logits) -> int:
        """Sample, verify guesses, stream and commit; returns the tokens that decoding turns produced."""
        now = time.perf_counter()
        # greedy rows are picked on the model's device; only their ids come back (one copy per step)
        greedy = logits.argmax(dim=-1).tolist()
        row = 0
        decoded = 0
        for planned in plan:
            turn = planned.turn
            samples = planned.completes_prompt  # read before the prefill position moves
            logits_row = row
            row += planned.logits_rows
            if planned.draft:
                decoded += self._accept_draft(planned, greedy[logits_row : row], now)
                continue
            self.store.commit(turn.session_id, planned.tokens, share=self._sharing)  # their K/V are in the pool now
            if turn.state is TurnState.PREFILLING:
                turn.prefill_position += len(planned.tokens)
            if not samples:
                continue
            try:
                if turn.sampling.greedy:
                    token = greedy[logits_row]
                else:
                    token = next_token(logits[logits_row].cpu(), turn.sampling, turn.generator,
                                       recent_ids(turn.prompt_ids, turn.reply_ids))
                if turn.state is TurnState.PREFILLING:
                    turn.state = TurnState.DECODING
                    turn.first_token_at = now
                    turn.batch_size = len(plan)
                else:
                    decoded += 1
                self._append_token(turn, token, now)
            except Exception as exc:  # noqa: BLE001 - fail this turn, the others in the step go on
                self._finish(turn, "error", f"Could not pick the next token: {exc}")
        return decoded

    def _accept_draft(self, planned: PlannedSegment, picks: list[int], now: float) -> int:
        """Keep the guesses the model agrees with, then its own pick after them; returns the tokens added.

        ``picks[i]`` is the greedy token after ``planned.tokens[i]``: plain decoding would have produced
        ``picks[0]``, then (if it equals the first guess) ``picks[1]``, and so on, so the reply is the same
        token for token. Each token goes through ``_append_token`` as if decoded alone (stop, length,
        cancel and time limits apply between any two), and the K/V of a fed token is committed just before
        the token it produced, as plain decoding does; K/V written for rejected guesses lie beyond the
        session's length and are overwritten by later steps.
        """
        turn = planned.turn
        accepted = 0
        while accepted < len(planned.draft) and picks[accepted] == planned.draft[accepted]:
            accepted += 1
        self.metrics.record_draft(len(planned.draft))
        added = 0
        for fed, token in zip(planned.tokens, picks[: accepted + 1]):
            self.store.commit(turn.session_id, [fed], share=self._sharing)
            self._append_token(turn, token, now)
            added += 1
            if turn.state is TurnState.FINISHED:
                break
        self.metrics.record_draft_accepted(min(added, accepted))
        return added

    def _append_token(self, turn: Turn, token: int, now: float) -> None:
        turn.reply_ids.append(token)
        turn.last_token_at = now
        self.metrics.record_generated(1)
        if token in self.eos_ids:
            self._finish(turn, "stop")
            return
        delta = turn.detokenizer.add(token)
        if delta is not None:
            turn.reply_text += delta
            turn.handle._push(TokenEvent(turn.session_id, delta, token))
        if turn.cancel_requested:
            self._finish(turn, "cancelled")
        elif len(turn.reply_ids) >= turn.max_new_tokens:
            self._finish(turn, "length")
        elif turn.sampling.max_time_ms and (now - turn.admitted_at) * 1000 >= turn.sampling.max_time_ms:
            self._finish(turn, "time")

    # finishing ---------------------------------------------------------------------------------
    def _finish(self, turn: Turn, reason: FinishReason, error: str | None = None) -> None:
        if turn.state is TurnState.FINISHED:
            return
        was_admitted = turn.state is not TurnState.WAITING
        turn.state = TurnState.FINISHED
        turn.finish_reason = reason
        turn.error = error
        self.scheduler.remove(turn)
        if was_admitted:
            self.store.pinned.discard(turn.session_id)
            if not (self.kv_options.enabled and self.kv_options.persist_across_requests):
                self.store.drop(turn.session_id)
            else:
                self.store.trim(turn.session_id)  # give back the room reserved for tokens never generated
            self.metrics.record_turn(
                turn.prompt_tokens, turn.reused_tokens, turn.reused_from == "disk", turn.ttft_ms, turn.shared_tokens
            )
        reply_ids = turn.reply_ids
        reply = self.tokenizer.decode([t for t in reply_ids if t not in self.eos_ids], skip_special_tokens=True)
        result = TurnResult(
            session_id=turn.session_id,
            reply=reply,
            reply_ids=list(reply_ids),
            prompt_ids=list(turn.prompt_ids),
            prompt_tokens=turn.prompt_tokens,
            reused_tokens=turn.reused_tokens,
            reused_from=turn.reused_from,
            shared_tokens=turn.shared_tokens,
            shared_from=turn.shared_from,
            prefilled_tokens=turn.prompt_tokens - turn.reused_tokens,
            new_tokens=len(reply_ids),
            ttft_ms=turn.ttft_ms,
            decode_tok_s=turn.decode_tok_s,
            batch_size=turn.batch_size,
            finish_reason=reason,
            dropped_messages=turn.dropped_messages,
            error=error,
            total_ms=(time.perf_counter() - turn.submitted_at) * 1000,
        )
        turn.handle._finish(result)

    # KV on disk --------------------------------------------------------------------------------
    def _spill_to_disk(self, entry: SessionKv) -> None:
        """An evicted session goes to disk if it can; if not, it is dropped all the same (it can be recomputed)."""
        if self.snapshots is None:
            return
        try:
            self.snapshots.save(entry.session_id, self.store.session_kv(entry), list(entry.token_ids))
        except Exception as exc:  # noqa: BLE001 - a failed spill must never fail the turn that needed the room
            self._log(f"could not write the KV of session {entry.session_id} to disk while evicting it: {exc}")

    def _snapshot_now(self, session_ids: list[str] | None) -> int:
        written = 0
        with self._lock:
            for entry in self.store.sessions():
                if session_ids is not None and entry.session_id not in session_ids:
                    continue
                if entry.length and self.snapshots.save(entry.session_id, self.store.session_kv(entry), list(entry.token_ids)):
                    written += 1
        return written

    def _forget_now(self, session_id: str) -> None:
        with self._lock:
            self._forked_from.pop(session_id, None)
            self._dropped.pop(session_id, None)
            self.store.drop(session_id)
            if self.snapshots is not None:
                self.snapshots.delete(session_id)
