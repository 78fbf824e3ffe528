"""``chatkv bench``: one real run at CI size, and its JSON checked for shape and internal consistency.

Never a speed threshold: these machines are shared and noisy. What must hold in any run is checked:
every figure positive, percentiles ordered, prefilled = prompt - reused, the fp32 exactness checks
passed, KV bytes per token the same from the engine's tensors and from the config.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chatkv.bench.plot import plotting_available
from chatkv.bench.scenarios import NAMES
from chatkv.bench.sizes import TINY, TINY_ENV
from chatkv.bench.stats import percentile, slope
from chatkv.cli import main


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([1.0, 2.0], 50) == 1.5
    assert percentile([5.0], 99) == 5.0
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) <= percentile(values, 95) <= percentile(values, 99) <= 100.0


def test_slope_of_a_line() -> None:
    assert slope([0, 1, 2], [1, 3, 5]) == pytest.approx(2.0)
    assert slope([1, 1], [2, 3]) == 0.0


def test_unknown_scenario_is_refused_before_loading_anything(capsys: pytest.CaptureFixture[str], data_dir: Path) -> None:
    assert main(["bench", "nonsense"]) == 2
    assert "unknown scenario nonsense" in capsys.readouterr().err


@pytest.mark.skipif(plotting_available(), reason="matplotlib is installed here")
def test_plot_without_matplotlib_says_what_to_install(capsys: pytest.CaptureFixture[str], data_dir: Path) -> None:
    assert main(["bench", "seed", "--plot", "out.png"]) == 2
    assert "chatkv[plot]" in capsys.readouterr().err


@pytest.fixture(scope="module")
def bench_run(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    """``chatkv bench --quick --json`` at CI size (every scenario), in a subprocess as a user runs it."""
    folder = tmp_path_factory.mktemp("bench")
    out = folder / "out.json"
    env = {**os.environ, TINY_ENV: "1", "CHATKV_HOME": str(folder / "home")}
    completed = subprocess.run(
        [sys.executable, "-m", "chatkv", "bench", "--quick", "--json", str(out), "--model", str(smollm2_dir)],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(out.read_text()), completed.stdout


def _positive(*values: float) -> bool:
    return all(value is not None and value > 0 for value in values)


@pytest.mark.real_model
def test_json_follows_the_contract(bench_run: tuple[dict, str]) -> None:
    document, stdout = bench_run
    machine = document["machine"]
    for key in ("cpu", "cores", "torch", "dtype", "model"):
        assert machine[key], key
    assert set(document["scenarios"]) == set(NAMES)
    for name, scenario in document["scenarios"].items():
        assert scenario["status"] in ("ok", "unavailable"), (name, scenario.get("reason"))
        if scenario["status"] == "ok":
            assert isinstance(scenario["parameters"], dict) and scenario["parameters"]
            assert isinstance(scenario["figures"], dict) and scenario["figures"]
            assert f"== {name} ==" in stdout
    assert document["run"]["size"] == TINY.label


@pytest.mark.real_model
def test_seed_figures_are_consistent(bench_run: tuple[dict, str]) -> None:
    seed = bench_run[0]["scenarios"]["seed"]
    assert seed["check"]["passed"] is True
    requests = seed["parameters"]["requests"]
    for system in ("no_cache", "generate", "chatkv"):
        figures = seed["figures"][system]
        assert figures["requests"] == requests
        assert _positive(figures["avg_ms"], figures["req_s"], figures["tok_s"], figures["avg_ttft_ms"], figures["p50_ttft_ms"])
        assert 0 < figures["p50_ms"] <= figures["p95_ms"] <= figures["p99_ms"]
        assert figures["avg_ttft_ms"] <= figures["avg_ms"]
        assert 0 < figures["new_tokens"] <= requests * seed["parameters"]["max_new_tokens"]
    chatkv = seed["figures"]["chatkv"]
    for request in chatkv["per_request"]:
        assert request["prefilled_tokens"] == request["prompt_tokens"] - request["reused_tokens"]
        # every request is a new session: all it reuses comes from blocks other sessions computed
        assert request["reused_tokens"] == request["shared_tokens"]
        if request["repeat"] == 0:
            # the first ask of a prompt shares only the template's opening (its default system prompt)
            assert request["prefilled_tokens"] > 16
        else:
            # the prompt's full blocks come from the earlier ask; at most its last partial block is prefilled again
            assert request["reused_from"] == "memory"
            assert request["prompt_tokens"] - 16 <= request["reused_tokens"]
    assert chatkv["prefilled_tokens"] == chatkv["prompt_tokens"] - chatkv["reused_tokens"]


@pytest.mark.real_model
def test_multiturn_reuses_history(bench_run: tuple[dict, str]) -> None:
    multiturn = bench_run[0]["scenarios"]["multiturn"]
    turns = multiturn["parameters"]["turns"]
    chatkv_rows = multiturn["figures"]["chatkv"]["per_turn"]
    loop_rows = multiturn["figures"]["generate_loop"]["per_turn"]
    assert len(chatkv_rows) == len(loop_rows) == turns
    for previous, row in zip(chatkv_rows, chatkv_rows[1:]):
        assert row["prompt_tokens"] > previous["prompt_tokens"]
        assert row["reused_tokens"] > 0
    for row in chatkv_rows + loop_rows:
        assert _positive(row["ttft_ms"], row["prompt_tokens"])
    for row in chatkv_rows:
        assert row["prefilled_tokens"] == row["prompt_tokens"] - row["reused_tokens"]
    assert _positive(multiturn["figures"]["comparison"]["last_turn_ttft_speedup"])


@pytest.mark.real_model
def test_batching_figures_are_consistent(bench_run: tuple[dict, str]) -> None:
    batching = bench_run[0]["scenarios"]["batching"]
    assert batching["check"]["passed"] is True
    levels = batching["parameters"]["levels"]
    for mode in ("chatkv_continuous", "chatkv_prefill_only"):
        rows = batching["figures"][mode]["by_sessions"]
        assert [row["sessions"] for row in rows] == levels
        for row in rows:
            assert _positive(row["tok_s"], row["wall_s"], row["new_tokens"], row["forward_passes"])
            assert 1.0 <= row["avg_sessions_per_forward"] <= row["sessions"] + 1e-9
    for name in ("generate_sequential", "chatkv_sequential"):
        assert _positive(batching["figures"][name]["tok_s"])
    assert _positive(*batching["figures"]["comparison"].values())


@pytest.mark.real_model
def test_shared_prefix_later_tabs_prefill_only_their_own_tokens_and_hold_one_system_prompt(bench_run: tuple[dict, str]) -> None:
    scenario = bench_run[0]["scenarios"]["shared-prefix"]
    assert scenario["check"]["passed"] is True
    shared, unshared = scenario["figures"]["shared"], scenario["figures"]["unshared"]
    assert scenario["figures"]["comparison"]["later_tabs_prefill_only_own_tokens"] is True
    for tab in shared["per_tab"][1:]:
        assert tab["system_tokens"] >= 400 and tab["shared_tokens"] >= tab["system_tokens"] - shared["block_size"]
        assert tab["prefilled_tokens"] == tab["prompt_tokens"] - tab["reused_tokens"]
    assert all(tab["reused_tokens"] == 0 for tab in unshared["per_tab"][1:])
    assert shared["kv_bytes_vs_minimum"] <= 1.3 < unshared["kv_bytes_vs_minimum"]
    assert shared["shared_bytes_saved"] > 0 == unshared["shared_bytes_saved"]


@pytest.mark.real_model
def test_memory_counts_kv_bytes_two_ways(bench_run: tuple[dict, str]) -> None:
    memory = bench_run[0]["scenarios"]["memory"]
    parameters = memory["parameters"]
    per_token = memory["figures"]["kv_bytes_per_token"]
    expected = parameters["layers"] * 2 * parameters["kv_heads"] * parameters["head_dim"] * parameters["element_size"]
    assert per_token["from_config"] == expected
    assert per_token["agree"] is True and per_token["from_engine_tensors"] == expected
    for system in ("generate", "chatkv"):
        for row in memory["figures"][system]["by_tokens"]:
            assert _positive(row["rss_after_load_bytes"], row["peak_rss_serving_bytes"], row["session_tokens"])
            assert row["peak_rss_serving_bytes"] >= row["rss_end_bytes"]
    for row in memory["figures"]["budget_fit"]:
        assert row["sessions_fit"] >= 1
        assert row["sessions_fit"] * row["kv_bytes_per_session"] <= parameters["kv_budget_bytes"]


@pytest.mark.real_model
def test_limits_and_snapshot_figures_are_positive(bench_run: tuple[dict, str]) -> None:
    limits = bench_run[0]["scenarios"]["limits"]["figures"]
    assert _positive(*limits["machine"].values(), *limits["ceilings"].values())
    assert _positive(limits["chatkv"]["single_decode_tok_s"], limits["chatkv"]["prefill_tok_s"])
    snapshot = bench_run[0]["scenarios"]["snapshot"]
    figures = snapshot["figures"]
    assert figures["comparison"]["restored_from_disk"] is True
    assert snapshot["parameters"]["conversation_tokens"] >= 1500
    disk, recompute = figures["disk"]["samples"][0], figures["recompute"]["samples"][0]
    assert disk["prefilled_tokens"] < recompute["prefilled_tokens"] == recompute["prompt_tokens"]
    assert _positive(figures["disk"]["avg_ttft_ms"], figures["recompute"]["avg_ttft_ms"], figures["memory"]["avg_ttft_ms"])


@pytest.mark.real_model
def test_branching_turns_prefill_only_what_follows_their_shared_prefix(bench_run: tuple[dict, str]) -> None:
    branching = bench_run[0]["scenarios"]["branching"]
    figures = branching["figures"]
    for kind in ("regenerate", "edit", "fork"):
        cached, recomputed = figures[kind]["cached"]["samples"][0], figures[kind]["recomputed"]["samples"][0]
        assert cached["prompt_tokens"] == recomputed["prompt_tokens"]
        assert cached["prefilled_tokens"] < recomputed["prefilled_tokens"] == recomputed["prompt_tokens"]
        assert _positive(figures[kind]["cached"]["avg_ttft_ms"], figures[kind]["recomputed"]["avg_ttft_ms"])
    assert figures["regenerate"]["cached"]["samples"][0]["prefilled_tokens"] == 1
    fork = figures["fork"]["cached"]["samples"][0]
    assert fork["shared_tokens"] == fork["reused_tokens"] > 0
    memory = figures["memory"]
    assert memory["parent_bytes"] < memory["parent_and_3_forks_bytes"] and memory["shared_bytes_saved"] > 0
    # the forks share the parent's blocks: a parent and 3 forks hold far less than 4 copies of the conversation
    assert memory["parent_and_3_forks_bytes"] < memory["4_independent_copies_bytes"] / 2
    assert memory["4_independent_copies_bytes"] > 3 * memory["parent_bytes"]


@pytest.mark.real_model
def test_speed_puts_chatkv_beside_generate_and_llama_cpp_or_says_why_not(bench_run: tuple[dict, str]) -> None:
    speed = bench_run[0]["scenarios"]["speed"]
    figures = speed["figures"]
    assert _positive(figures["chatkv"]["decode_tok_s"], figures["generate"]["decode_tok_s"])
    assert figures["comparison"]["chatkv_vs_generate"] > 0
    if figures["llama_cpp"]:
        assert _positive(figures["llama_cpp"]["tg_tok_s"], figures["comparison"]["chatkv_vs_llama_cpp"])
    else:
        assert any("llama" in note for note in speed["notes"])
        assert "llama.cpp" in bench_run[1] and "not run" in bench_run[1]
    # the same reply through the App (headless chatkv in a child process), as a user sees it
    assert _positive(figures["chatkv_app"]["decode_tok_s"], figures["chatkv_app"]["quote_decode_tok_s"],
                     figures["comparison"]["chatkv_app_vs_generate"])
    assert "through the App" in bench_run[1]
    # the reply that quotes its context, with speculative decoding on and off
    quote = figures["quote"]
    assert _positive(quote["decode_tok_s"], quote["no_draft"]["decode_tok_s"], quote["draft_tokens"])
    assert 0.0 <= quote["draft_acceptance_rate"] <= 1.0
    assert quote["accepted_draft_tokens"] <= quote["drafted_tokens"]
    assert isinstance(quote["identical_to_no_draft"], bool)
    assert "quoting" in bench_run[1]


def test_speed_finds_no_llama_bench_where_the_path_given_is_missing(tmp_path: Path) -> None:
    from chatkv.bench.scenarios.speed import find_llama_bench

    assert find_llama_bench(str(tmp_path / "llama-bench")) is None
    given = tmp_path / "llama-bench"
    given.write_text("")
    assert find_llama_bench(str(given)) == given


@pytest.mark.real_model
def test_contention_measures_quiet_and_busy_with_the_thread_policy(bench_run: tuple[dict, str]) -> None:
    contention = bench_run[0]["scenarios"]["contention"]
    chatkv = contention["figures"]["chatkv"]
    assert _positive(chatkv["quiet_tok_s"], chatkv["busy_tok_s"], chatkv["busy_all_cores_tok_s"])
    assert contention["parameters"]["policy_threads"] == max(1, contention["parameters"]["cores"] - 1)
