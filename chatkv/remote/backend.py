"""A remote OpenAI-compatible server (vLLM, SGLang, llama.cpp's server, ...) behind the local engine's surface.

``RemoteBackend`` offers what the App, headless mode and the bench use from ``Engine`` (``submit``,
``cancel``, ``forget``, ``snapshot``, ``stats``, ``session_stats``, ``close``), so the same tabs run
against a server. One background thread runs an asyncio loop with one ``httpx.AsyncClient``; each
turn is one streamed ``POST /chat/completions`` on that loop, and cancelling a turn closes its stream,
which is how OpenAI-compatible servers learn to abort a request.

The KV cache is the server's. Per turn, the cached prompt tokens are what the server reports
(``usage.prompt_tokens_details.cached_tokens``, else llama.cpp's ``timings.cache_n``); server-wide
figures come from its Prometheus ``/metrics``. Anything the server does not report stays None.

Helping the server's cache: every turn sends the conversation's messages exactly as stored (the
reply text as streamed, never re-rendered), so the prompt's earlier part is byte-identical to the
last turn's; with llama.cpp each session keeps its own slot (``id_slot``) with ``cache_prompt`` on.

httpx, not the openai SDK: chatkv needs the fields servers add beside the standard ones (llama.cpp's
``timings``, ``id_slot``, ``cache_prompt``), the raw status and error body of a refused request, and
exact control over timeouts and retries (the SDK retries on its own); httpx gives all of that
directly, and the SDK is itself a layer over httpx.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from concurrent.futures import Future
from typing import Any

import httpx

from chatkv.config import BackendOptions
from chatkv.conversation import Message
from chatkv.engine.api import (BackendCapabilities, EngineError, EngineStats, FinishReason, Sampling, SessionStats,
                               TokenEvent, TurnHandle, TurnResult, check_turn_request)
from chatkv.remote.http_errors import describe_status, describe_transport_error
from chatkv.remote.server_metrics import ServerReport, parse_metrics

METRICS_EVERY_S = 2.0  # the panel refreshes often; the server's page is scraped at most this often
RATE_WINDOW_S = 10.0
HIT_RATE_WINDOW_TURNS = 20
HISTORY_POINTS = 60


class BackendUnavailable(EngineError):
    """The server cannot be used at all (bad URL); the message says what to do."""


@dataclass
class ServerInfo:
    """What the probe at start learned: the server's models, its kind, llama.cpp's slot count."""

    reachable: bool = False
    models: list[str] = field(default_factory=list)
    kind: str = "unknown"  # "llama.cpp", "vllm", "sglang" or "unknown"
    slots: int = 0  # llama.cpp's parallel slots; 0 elsewhere


@dataclass
class _Turn:
    session_id: str
    model: str
    sampling: Sampling
    handle: TurnHandle
    submitted_at: float = field(default_factory=time.perf_counter)
    slot: int | None = None
    reply: str = ""
    chunks: int = 0  # streamed pieces of content (the token count when the server reports no usage)
    first_token_at: float = 0.0
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def cached_prompt_tokens(usage: dict[str, Any] | None, timings: dict[str, Any] | None) -> int | None:
    """The prompt tokens the server served from its cache, as it reports them; None if it does not."""
    details = (usage or {}).get("prompt_tokens_details")
    if isinstance(details, dict) and _int_or_none(details.get("cached_tokens")) is not None:
        return details["cached_tokens"]
    if timings is not None:
        return _int_or_none(timings.get("cache_n"))
    return None


def api_root(url: str) -> str:
    """``http://host:8000/v1`` -> ``http://host:8000``: where ``/metrics``, ``/props`` and ``/slots`` live."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


class RemoteBackend:
    """Serves chat turns from an OpenAI-compatible server; the ``Engine`` surface the App and headless mode use."""

    capabilities = BackendCapabilities(holds_kv=False, server_models=True)

    def __init__(self, options: BackendOptions, api_key: str | None = None) -> None:
        """Raises ``BackendUnavailable`` for a URL that is not http(s); nothing touches the network until ``start``."""
        url = options.url.rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise BackendUnavailable(f"--backend must be an http:// or https:// URL such as http://127.0.0.1:8000/v1, got {options.url!r}")
        self.options = options
        self.url = url
        self.root = api_root(url)
        self._api_key = api_key
        self.info = ServerInfo()
        self.default_model = options.model
        self._models: dict[str, str] = {}  # session -> model chosen for it in the palette
        self._slots: dict[str, int | None] = {}  # session -> its own llama.cpp slot (None: there was none left)
        self._running: dict[str, tuple[_Turn, Future[None]]] = {}  # session -> its turn and the task serving it
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: httpx.AsyncClient | None = None
        # figures (under _lock)
        self._turns = 0
        self._turn_hits = 0
        self._reported_prompt = 0
        self._reported_reused = 0
        self._recent: deque[tuple[int, int]] = deque(maxlen=HIT_RATE_WINDOW_TURNS)
        self._token_times: deque[float] = deque()
        self._history: deque[float] = deque(maxlen=HISTORY_POINTS)
        self._history_at = 0.0
        self._generated = 0
        self._last_ttft_ms = 0.0
        self._last_prompt: dict[str, tuple[int | None, int | None]] = {}  # session -> (prompt, cached) of its last turn
        self._server_report: ServerReport | None = None
        self._scraped_at = 0.0
        self._scraping = False

    # lifecycle ---------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> None:
        return None  # no local model

    def start(self) -> "RemoteBackend":
        """Start the network thread and its HTTP client; ``probe`` then asks the server what it serves."""
        if self._thread is not None:
            return self
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="chatkv-remote", daemon=True)
        self._thread.start()
        timeout = httpx.Timeout(self.options.read_timeout_s, connect=self.options.connect_timeout_s)
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

        async def make_client() -> httpx.AsyncClient:
            # no connection cap below the server's own: every tab streams at once and the server batches them
            return httpx.AsyncClient(timeout=timeout, headers=headers, limits=httpx.Limits(max_connections=None))

        self._client = self._call(make_client())
        return self

    def _call(self, coroutine) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def probe(self) -> list[str]:
        """Ask the server for its models (and llama.cpp for its slots); return notes for the user, empty if all is well."""
        return self._call(self._probe())

    def close(self) -> None:
        if self._thread is None or self._loop is None:
            return
        client = self._client

        async def shut() -> None:
            # every running turn ends as cancelled, its stream closed, before the client goes
            turns = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in turns:
                task.cancel()
            if turns:
                await asyncio.wait(turns, timeout=5)
            if client is not None:
                await client.aclose()

        try:
            self._call(shut())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._thread = None
            self._loop.close()

    def __enter__(self) -> "RemoteBackend":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()

    # models --------------------------------------------------------------------------------------
    def models(self) -> list[str]:
        """The models the server listed at the last probe (``GET /v1/models``)."""
        return list(self.info.models)

    def refresh_models(self) -> list[str]:
        self.probe()
        return self.models()

    def model_for(self, session_id: str) -> str:
        return self._models.get(session_id) or self.default_model

    def set_model(self, session_id: str, model: str) -> None:
        """Serve the session's next turns with ``model`` (one of ``models()``)."""
        self._models[session_id] = model

    # public API (the Engine's) -----------------------------------------------------------------
    def submit(self, session_id: str, messages: list[Message], sampling: Sampling | None = None) -> TurnHandle:
        """Send a turn: ``messages`` is the whole conversation ending with the new user message.

        Returns at once; the handle streams the reply and ends with a ``TurnResult`` whose error (if
        any) is a message for the user. Raises ``EngineError`` for a request that cannot be sent at all.
        """
        sampling = check_turn_request(session_id, messages, sampling)
        if self._loop is None or self._thread is None:
            raise EngineError("the remote backend is not running")
        model = self.model_for(session_id)  # may be "" while the server has not been reached yet: _serve asks again
        turn = _Turn(session_id, model, sampling, TurnHandle.for_caller(session_id))
        with self._lock:
            if session_id in self._running:
                raise EngineError("this conversation is still replying; wait for it or stop it first")
            turn.slot = self._slot_for(session_id)
            future = asyncio.run_coroutine_threadsafe(self._serve(turn, messages), self._loop)
            self._running[session_id] = (turn, future)
        return turn.handle

    async def until_ready(self) -> None:
        """Ready once started: a server that is down fails each turn with a message instead."""

    def cancel(self, session_id: str) -> bool:
        """Stop the session's reply by closing its stream (the server aborts it); the text so far is kept."""
        with self._lock:
            running = self._running.get(session_id)
        if running is None or self._loop is None:
            return False
        self._loop.call_soon_threadsafe(running[1].cancel)
        return True

    def forget(self, session_id: str) -> None:
        """The session is gone: stop its turn and give its llama.cpp slot back."""
        self.cancel(session_id)
        with self._lock:
            self._slots.pop(session_id, None)
            self._models.pop(session_id, None)
            self._last_prompt.pop(session_id, None)

    def fork_kv(self, parent_session_id: str, child_session_id: str) -> int:
        """Nothing to copy: the KV lives on the server, whose prompt cache may serve the fork's shared prefix."""
        return 0

    def snapshot(self, session_ids: list[str] | None = None) -> int:
        """Nothing to write: the KV lives on the server. Conversations persist as usual."""
        return 0

    def session_stats(self, session_id: str) -> SessionStats:
        with self._lock:
            prompt, cached = self._last_prompt.get(session_id, (None, None))
            slot = self._slots.get(session_id) if len(self._slots) <= self.info.slots else None  # pinned only then
        return SessionStats(session_id, tokens=prompt or 0, bytes=0, resident=False, model=self.model_for(session_id),
                            slot=slot, server_cached_tokens=cached, server_prompt_tokens=prompt)

    def stats(self) -> EngineStats:
        """Client-side figures (TTFT, tok/s, reuse as the server reported it) and the last server-wide scrape."""
        self._maybe_scrape()
        now = time.monotonic()
        with self._lock:
            rate = self._rate(now)
            if now - self._history_at >= 0.5:
                self._history_at = now
                self._history.append(round(rate, 1))
            recent_prompt = sum(p for p, _ in self._recent)
            return EngineStats(
                prompt_tokens=self._reported_prompt,
                reused_tokens=self._reported_reused,
                hit_rate=self._reported_reused / self._reported_prompt if self._reported_prompt else 0.0,
                hit_rate_window=sum(r for _, r in self._recent) / recent_prompt if recent_prompt else 0.0,
                turns=self._turns,
                turn_hits=self._turn_hits,
                active_turns=len(self._running),
                decode_tok_s=rate,
                decode_tok_s_history=list(self._history),
                last_ttft_ms=self._last_ttft_ms,
                generated_tokens=self._generated,
                server=self._server_report or ServerReport(kind=self.info.kind),
            )

    # the network thread --------------------------------------------------------------------------
    async def _probe(self) -> list[str]:
        assert self._client is not None
        notes: list[str] = []
        try:
            response = await self._client.get(f"{self.url}/models")
        except httpx.TransportError as exc:
            self.info.reachable = False
            return [describe_transport_error(exc, self.url, self.options.read_timeout_s)
                    + " Your conversations are all here; replies need the server."]
        self.info.reachable = True
        if response.status_code >= 400:
            return [describe_status(response.status_code, response.content, self.default_model, self.options.api_key_env)]
        try:
            listed = response.json().get("data") or []
            self.info.models = [item["id"] for item in listed if isinstance(item, dict) and isinstance(item.get("id"), str)]
            owners = {str(item.get("owned_by", "")).lower() for item in listed if isinstance(item, dict)}
        except (ValueError, AttributeError):
            return [f"{self.url}/models did not answer with a model list; is --backend the server's /v1 URL?"]
        self.info.kind = "llama.cpp" if "llamacpp" in owners else "vllm" if "vllm" in owners else "sglang" if "sglang" in owners else "unknown"
        if not self.default_model and self.info.models:
            self.default_model = self.info.models[0]
        elif self.default_model and self.info.models and self.default_model not in self.info.models:
            notes.append(f"The server does not list the model {self.default_model!r}; it lists {', '.join(self.info.models)}. "
                         "Pick one from the command palette (Ctrl+P, 'Model:') or with --model.")
        if self.info.kind == "llama.cpp":
            await self._probe_slots()
        return notes

    async def _probe_slots(self) -> None:
        assert self._client is not None
        try:
            response = await self._client.get(f"{self.root}/props")
            slots = response.json().get("total_slots") if response.status_code == 200 else None
        except (httpx.TransportError, ValueError, AttributeError):
            slots = None
        self.info.slots = slots if isinstance(slots, int) and slots > 0 else 0

    def _slot_for(self, session_id: str) -> int | None:
        """llama.cpp: the session's own slot, so its prompt stays cached there between turns (called under _lock).

        Sessions are pinned only while there is a slot for each; with more sessions than slots, none is
        and the server picks (it moves evicted prompts through its host-memory prompt cache). Measured on
        llama-server with 2 slots, prompt tokens reused from turn 2 on: 2 tabs, 82% pinned or not; 4 tabs,
        88% left to the server, but 53% when new tabs took the least recently used tab's slot and 48% when
        only the first two tabs were pinned.
        """
        if self.info.kind != "llama.cpp" or self.info.slots <= 0:
            return None
        if session_id not in self._slots:
            held = set(self._slots.values())
            self._slots[session_id] = next((s for s in range(self.info.slots) if s not in held), None)
        if len(self._slots) > self.info.slots:
            return None
        return self._slots[session_id]

    def _request_body(self, turn: _Turn, messages: list[Message]) -> dict[str, Any]:
        sampling = turn.sampling
        body: dict[str, Any] = {
            "model": turn.model,
            # exactly the stored text, so the part already sent is byte-identical and the server's prefix cache hits
            "messages": [{"role": message.role, "content": message.content} for message in messages],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
        }
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if turn.slot is not None:
            body["id_slot"] = turn.slot
            body["cache_prompt"] = True
        return body

    async def _serve(self, turn: _Turn, messages: list[Message]) -> None:
        reason: FinishReason = "stop"
        error: str | None = None
        try:
            if not turn.model:
                error = await self._find_model(turn)
            limit = turn.sampling.max_time_ms / 1000 if turn.sampling.max_time_ms else None
            if error is None:
                async with asyncio.timeout(limit):
                    error = await self._stream(turn, messages)
            if error is not None:
                reason = "error"
            elif turn.finish_reason == "length":
                reason = "length"
        except TimeoutError:
            reason = "time"
        except asyncio.CancelledError:
            reason = "cancelled"
        except httpx.TransportError as exc:
            reason, error = "error", describe_transport_error(exc, self.url, self.options.read_timeout_s)
        except Exception as exc:  # noqa: BLE001 - a bug or a malformed answer fails this turn, never the app
            reason, error = "error", f"The reply from {self.url} could not be read ({type(exc).__name__}: {exc}). Send again to retry."
        if reason == "error" and turn.reply:
            error = f"{error} The {len(turn.reply)} characters received before the failure are shown above."
        self._finish(turn, reason, error)

    async def _find_model(self, turn: _Turn) -> str | None:
        """The server was not reachable at launch: ask it again now; an error message if there is still no model."""
        notes = await self._probe()
        turn.model = self.model_for(turn.session_id)
        with self._lock:
            turn.slot = self._slot_for(turn.session_id)  # the slot count is known only now
        if turn.model:
            return None
        return notes[0] if notes else f"The server at {self.url} lists no models; name one with --model."

    async def _stream(self, turn: _Turn, messages: list[Message]) -> str | None:
        """Stream one reply into ``turn``; returns an error message, or None if the server finished it."""
        assert self._client is not None
        body = self._request_body(turn, messages)
        async with self._client.stream("POST", f"{self.url}/chat/completions", json=body) as response:
            if response.status_code >= 400:
                content = await response.aread()
                return describe_status(response.status_code, content, turn.model, self.options.api_key_env,
                                       response.headers.get("retry-after"))
            done = False
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, SSE comments (": ping"), event names
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if isinstance(chunk, dict) and chunk.get("error"):
                    error = chunk["error"]
                    message = error.get("message") if isinstance(error, dict) else str(error)
                    return f"The server stopped the reply with an error: {message}. Send again to retry."
                self._take_chunk(turn, chunk)
            if not done and turn.finish_reason is None:
                return "The server closed the stream before the reply was finished. Send again to retry."
        return None

    def _take_chunk(self, turn: _Turn, chunk: dict[str, Any]) -> None:
        if isinstance(chunk.get("usage"), dict):
            turn.usage = chunk["usage"]
        if isinstance(chunk.get("timings"), dict):
            turn.timings = chunk["timings"]
        for choice in chunk.get("choices") or []:
            if choice.get("finish_reason"):
                turn.finish_reason = choice["finish_reason"]
            text = (choice.get("delta") or {}).get("content")
            if not text:
                continue
            now = time.perf_counter()
            if not turn.first_token_at:
                turn.first_token_at = now
            turn.reply += text
            turn.chunks += 1
            with self._lock:
                stamp = time.monotonic()
                self._token_times.append(stamp)
                while stamp - self._token_times[0] > RATE_WINDOW_S:  # bounded even if nobody asks for stats
                    self._token_times.popleft()
            turn.handle._push(TokenEvent(turn.session_id, text, -1))

    def _finish(self, turn: _Turn, reason: FinishReason, error: str | None) -> None:
        usage = turn.usage or {}
        prompt = _int_or_none(usage.get("prompt_tokens"))
        cached = cached_prompt_tokens(turn.usage, turn.timings)
        new_tokens = _int_or_none(usage.get("completion_tokens"))
        if new_tokens is None:
            new_tokens = turn.chunks
        ttft_ms = (turn.first_token_at - turn.submitted_at) * 1000 if turn.first_token_at else 0.0
        # from the first token to the end of the stream: chunks can arrive bunched in one read, so the gap
        # between the first and the last one alone could be near zero
        span = time.perf_counter() - turn.first_token_at if turn.first_token_at else 0.0
        decode_tok_s = (new_tokens - 1) / span if new_tokens > 1 and span > 0 else 0.0
        if turn.timings is not None and _int_or_none(turn.timings.get("prompt_n")) is not None:
            prefilled = turn.timings["prompt_n"]
        else:
            prefilled = prompt - cached if prompt is not None and cached is not None else None
        with self._lock:
            self._running.pop(turn.session_id, None)
            self._turns += 1
            self._generated += new_tokens
            if ttft_ms:
                self._last_ttft_ms = ttft_ms
            if prompt is not None and cached is not None:
                self._reported_prompt += prompt
                self._reported_reused += cached
                self._turn_hits += cached > 0
                self._recent.append((prompt, cached))
            if prompt is not None or cached is not None:
                self._last_prompt[turn.session_id] = (prompt, cached)
        turn.handle._finish(TurnResult(
            session_id=turn.session_id, reply=turn.reply, reply_ids=[], prompt_ids=[],
            prompt_tokens=prompt, reused_tokens=cached, reused_from="server", prefilled_tokens=prefilled,
            new_tokens=new_tokens, ttft_ms=ttft_ms, decode_tok_s=decode_tok_s, batch_size=None,
            finish_reason=reason, error=error, total_ms=(time.perf_counter() - turn.submitted_at) * 1000,
        ))

    def _rate(self, now: float) -> float:
        """Streamed tokens per second over the last RATE_WINDOW_S, all sessions together (called under _lock)."""
        times = self._token_times
        while times and now - times[0] > RATE_WINDOW_S:
            times.popleft()
        if len(times) < 2:
            return 0.0
        span = now - times[0] if self._running else times[-1] - times[0]
        return (len(times) - 1) / span if span > 0 else 0.0

    # server-wide metrics ---------------------------------------------------------------------------
    def _maybe_scrape(self) -> None:
        """Start a scrape of /metrics in the background if the last one is old; stats() never waits on the network."""
        if not self.options.metrics or self._loop is None:
            return
        now = time.monotonic()
        with self._lock:
            if self._scraping or now - self._scraped_at < METRICS_EVERY_S:
                return
            self._scraping = True
            self._scraped_at = now
        asyncio.run_coroutine_threadsafe(self._scrape(), self._loop)

    async def _scrape(self) -> None:
        assert self._client is not None
        try:
            response = await self._client.get(f"{self.root}/metrics", timeout=self.options.connect_timeout_s)
            if response.status_code == 200:
                report = parse_metrics(response.text)
            else:
                report = ServerReport(kind=self.info.kind, scrape_error=f"/metrics answered {response.status_code}")
        except httpx.TransportError as exc:
            report = ServerReport(kind=self.info.kind, scrape_error=f"/metrics unreachable ({type(exc).__name__})")
        except ValueError as exc:
            report = ServerReport(kind=self.info.kind, scrape_error=f"/metrics is not Prometheus text ({exc})")
        with self._lock:
            self._server_report = report
            self._scraping = False

    def scrape_now(self) -> ServerReport:
        """Scrape /metrics and wait for it (headless stats and tests); nothing with ``[backend] metrics = false``."""
        if self._loop is None or not self.options.metrics:
            return ServerReport(kind=self.info.kind)
        with self._lock:
            self._scraping = True
            self._scraped_at = time.monotonic()
        self._call(self._scrape())
        with self._lock:
            return self._server_report or ServerReport(kind=self.info.kind)


def api_key_from_env(variable: str) -> str | None:
    """The key from the environment variable the user named; the key itself is never stored anywhere."""
    return os.environ.get(variable) or None
