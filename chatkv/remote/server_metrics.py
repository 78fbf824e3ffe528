"""The server's own view of its KV cache: its Prometheus ``/metrics`` page, parsed and reduced to a few figures.

Each serving engine names its metrics its own way; this module knows the names of the three we support
and reports only what the page actually holds. A figure the page does not carry stays None, and the
panel says "not reported": chatkv never fills a gap with a guess.

- vLLM: ``vllm:prefix_cache_queries`` and ``vllm:prefix_cache_hits`` (token counters; hit rate = hits /
  queries), ``vllm:kv_cache_usage_perc`` (``vllm:gpu_cache_usage_perc`` before v1), running and waiting requests.
- SGLang (``--enable-metrics``): ``sglang:cache_hit_rate``, ``sglang:cached_tokens_total`` where this version
  has it, ``sglang:token_usage`` (KV pool use), running and queued requests.
- llama.cpp (``--metrics``): ``llamacpp:prompt_tokens_total`` (prompt tokens it computed) and
  ``llamacpp:prompt_tokens_cached_total`` (prompt tokens it reused), processing and deferred requests.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class ServerReport:
    """Server-wide figures from one scrape; None where the server's page does not carry them.

    ``cache_hit_rate`` is a fraction in [0, 1]; ``kv_usage`` is the fraction of the server's KV memory in
    use, in [0, 1]; token counts are cumulative since the server started.
    """

    kind: str  # "vllm", "sglang", "llama.cpp" or "unknown"
    cache_hit_rate: float | None = None
    prompt_tokens: float | None = None  # prompt tokens the server looked up in (vLLM) or computed past (llama.cpp) its cache
    cached_prompt_tokens: float | None = None  # prompt tokens it served from its cache
    kv_usage: float | None = None
    requests_running: float | None = None
    requests_waiting: float | None = None
    scrape_error: str | None = None  # why the last scrape failed (the figures are then all None)


def _samples(text: str) -> dict[str, float]:
    """Every sample's value by its name, summed over label sets (vLLM labels each metric with the model name)."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + float(sample.value)
    return values


def _first(values: dict[str, float], *names: str) -> float | None:
    for name in names:
        if name in values:
            return values[name]
    return None


def parse_metrics(text: str) -> ServerReport:
    """Reduce a Prometheus exposition page to a ``ServerReport``. Raises ValueError if the text is not one."""
    values = _samples(text)
    if any(name.startswith("vllm:") for name in values):
        queries = _first(values, "vllm:prefix_cache_queries_total", "vllm:prefix_cache_queries")
        hits = _first(values, "vllm:prefix_cache_hits_total", "vllm:prefix_cache_hits")
        return ServerReport(
            kind="vllm",
            cache_hit_rate=hits / queries if hits is not None and queries else None,
            prompt_tokens=queries,
            cached_prompt_tokens=hits,
            kv_usage=_first(values, "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
            requests_running=_first(values, "vllm:num_requests_running"),
            requests_waiting=_first(values, "vllm:num_requests_waiting"),
        )
    if any(name.startswith("sglang:") for name in values):
        return ServerReport(
            kind="sglang",
            cache_hit_rate=_first(values, "sglang:cache_hit_rate"),
            cached_prompt_tokens=_first(values, "sglang:cached_tokens_total"),
            kv_usage=_first(values, "sglang:token_usage"),
            requests_running=_first(values, "sglang:num_running_reqs"),
            requests_waiting=_first(values, "sglang:num_queue_reqs"),
        )
    if any(name.startswith("llamacpp:") for name in values):
        computed = _first(values, "llamacpp:prompt_tokens_total")
        cached = _first(values, "llamacpp:prompt_tokens_cached_total")
        seen = computed + cached if computed is not None and cached is not None else None
        return ServerReport(
            kind="llama.cpp",
            cache_hit_rate=cached / seen if cached is not None and seen else None,
            prompt_tokens=seen,
            cached_prompt_tokens=cached,
            kv_usage=_first(values, "llamacpp:kv_cache_usage_ratio"),
            requests_running=_first(values, "llamacpp:requests_processing"),
            requests_waiting=_first(values, "llamacpp:requests_deferred"),
        )
    return ServerReport(kind="unknown")
