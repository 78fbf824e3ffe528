"""The server's /metrics page reduced to the panel's figures, and the panel showing them (or "not reported").

llama.cpp's page is checked against the real server in ``test_remote_llama_server.py``; vLLM and SGLang
cannot run here, so their pages are reproduced in their documented exposition format, labels included.
"""

from __future__ import annotations

import pytest
from textual.app import App, ComposeResult

from chatkv.engine.api import EngineStats, SessionStats
from chatkv.remote.server_metrics import ServerReport, parse_metrics
from chatkv.tui.widgets.stats_panel import StatsPanel, StatsSection

VLLM = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="Qwen/Qwen2.5-7B-Instruct"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="Qwen/Qwen2.5-7B-Instruct"} 1.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="Qwen/Qwen2.5-7B-Instruct"} 0.25
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="Qwen/Qwen2.5-7B-Instruct"} 4000.0
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="Qwen/Qwen2.5-7B-Instruct"} 3000.0
"""

SGLANG = """\
# HELP sglang:token_usage The token usage
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.28
# HELP sglang:cache_hit_rate The cache hit rate
# TYPE sglang:cache_hit_rate gauge
sglang:cache_hit_rate{model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.75
# HELP sglang:num_running_reqs The number of running requests
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="meta-llama/Llama-3.1-8B-Instruct"} 2.0
"""


def test_vllm_prefix_cache_counters_give_the_hit_rate_and_kv_usage():
    report = parse_metrics(VLLM)
    assert report.kind == "vllm"
    assert report.cache_hit_rate == pytest.approx(0.75)
    assert (report.prompt_tokens, report.cached_prompt_tokens) == (4000.0, 3000.0)
    assert (report.kv_usage, report.requests_running, report.requests_waiting) == (0.25, 3.0, 1.0)


def test_sglang_gives_its_hit_rate_and_leaves_what_it_does_not_export_empty():
    report = parse_metrics(SGLANG)
    assert (report.kind, report.cache_hit_rate, report.kv_usage, report.requests_running) == ("sglang", 0.75, 0.28, 2.0)
    assert report.requests_waiting is None and report.cached_prompt_tokens is None  # absent, never 0


def test_a_page_from_an_unknown_server_reports_nothing():
    assert parse_metrics("# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 1.5\n") == ServerReport(kind="unknown")


class PanelApp(App):
    def compose(self) -> ComposeResult:
        yield StatsPanel()


def section(panel: StatsPanel, name: str) -> str:
    return str(panel.query_one(f"#{name}", StatsSection).content)


async def test_the_panel_shows_the_servers_figures_hides_local_kv_and_says_not_reported():
    app = PanelApp()
    async with app.run_test() as pilot:
        panel = app.query_one(StatsPanel)
        stats = EngineStats(turns=2, last_ttft_ms=120.0, decode_tok_s=55.5,
                            server=ServerReport(kind="sglang", cache_hit_rate=0.75, requests_running=2.0))
        panel.show_stats(stats, SessionStats("s", 0, 0, False, model="m1", server_prompt_tokens=90, server_cached_tokens=None))
        await pilot.pause()
        server = section(panel, "server")
        assert "sglang" in server and "75.0%" in server
        assert "KV used   not reported" in server and "2 running · not reported waiting" in server
        # the server gave no per-turn cached counts: the reuse section says so instead of showing 0%
        assert "not reported" in section(panel, "hit-rate") and "0.0%" not in section(panel, "hit-rate")
        assert "not reported of 90 tok" in section(panel, "session") and "m1" in section(panel, "session")
        assert not panel.memory.display and not panel.batching.display and panel.server.display
        panel.show_stats(EngineStats(), None)  # back to the local engine: the local sections return
        assert panel.memory.display and not panel.server.display


class FixedPanelApp(App):
    """The panel on its own, as a llama.cpp server's figures show in it (fixed, for the snapshot)."""

    def compose(self) -> ComposeResult:
        yield StatsPanel()

    def on_mount(self) -> None:
        self.theme = "textual-dark"
        stats = EngineStats(
            prompt_tokens=1286, reused_tokens=1237, hit_rate=1237 / 1286, hit_rate_window=0.934, turns=12, turn_hits=11,
            active_turns=1, decode_tok_s=18.6, decode_tok_s_history=[12.0, 18.1, 18.6, 17.9, 18.6],
            last_ttft_ms=412.0, generated_tokens=768,
            server=ServerReport(kind="llama.cpp", cache_hit_rate=0.701, prompt_tokens=1937.0, cached_prompt_tokens=1357.0,
                                requests_running=1.0, requests_waiting=0.0),
        )
        session = SessionStats("tab", 0, 0, False, model="SmolLM2-135M-Instruct.Q4_1.gguf", slot=0,
                               server_prompt_tokens=1286, server_cached_tokens=1237)
        self.query_one(StatsPanel).show_stats(stats, session)


def test_the_panel_against_a_server_snapshot(snap_compare) -> None:
    assert snap_compare(FixedPanelApp(), terminal_size=(42, 30))
