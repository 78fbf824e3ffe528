"""memory: what serving a conversation costs in RAM, and how many conversations the KV budget holds.

Each measurement runs in a fresh child process (``memory_probe``) so its peak RSS is that of one
process serving one conversation, not of the bench. KV bytes per token are read two ways and must
agree: from the session's KV tensor in the engine (bytes / token slots) and from the model's config
(layers x 2 (K and V) x KV heads x head dim x element size).
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import torch

from chatkv.bench.context import BenchContext
from chatkv.bench.result import ScenarioResult, Table, fmt

MIB = 2**20
SYSTEMS = {"generate": "model.generate", "chatkv": "chatkv"}


def run(ctx: BenchContext) -> ScenarioResult:
    config = ctx.bundle.model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element_size = torch.empty((), dtype=ctx.bundle.dtype).element_size()
    from_config = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * element_size
    budget = ctx.settings.kv.max_bytes_total
    lengths = list(ctx.sizes.memory_session_tokens)
    result = ScenarioResult("memory", parameters={
        "session_tokens": lengths, "dtype": str(ctx.bundle.dtype).removeprefix("torch."),
        "kv_budget_bytes": budget, "max_sessions": ctx.settings.kv.max_sessions,
        "layers": config.num_hidden_layers, "kv_heads": config.num_key_value_heads, "head_dim": head_dim,
        "element_size": element_size, "measured_in": "a fresh child process per row (both systems' at once)",
    })

    rows: dict[str, list[dict[str, Any]]] = {system: [] for system in SYSTEMS}
    for tokens in lengths:
        # RSS does not depend on speed, so both systems' probes run at once (each in its own process)
        ctx.progress(f"memory: model.generate and chatkv each serving a {tokens:,}-token conversation (child processes)")
        for system, row in zip(SYSTEMS, _probe_all(ctx, list(SYSTEMS), tokens)):
            rows[system].append(row)
    for system in SYSTEMS:
        result.figures[system] = {"by_tokens": rows[system]}

    chatkv_rows = result.figures["chatkv"]["by_tokens"]
    from_tensors = chatkv_rows[0]["tensor_bytes"] / chatkv_rows[0]["tensor_token_slots"]
    result.figures["kv_bytes_per_token"] = {
        "from_engine_tensors": from_tensors,
        "from_config": from_config,
        "agree": from_tensors == from_config,
        # what the engine holds per token in use: slots are reserved in steps and for the reply
        "held_per_token_in_use": [row["kv_bytes_held"] / row["session_tokens"] for row in chatkv_rows],
    }
    result.figures["budget_fit"] = [
        {"session_tokens": tokens,
         "kv_bytes_per_session": from_tensors * tokens,
         "sessions_fit": min(int(budget // (from_tensors * tokens)), ctx.settings.kv.max_sessions)}
        for tokens in sorted({1024, 4096, *lengths})
    ]
    result.tables.extend(_tables(result.figures, budget))
    per_token = result.figures["kv_bytes_per_token"]
    result.notes.append(
        f"KV bytes per token: {fmt(per_token['from_engine_tensors'], 0)} from the engine's tensors, "
        f"{fmt(per_token['from_config'], 0)} from the config: {'they agree' if per_token['agree'] else 'THEY DIFFER'}.")
    result.notes.append("The engine reserves KV in steps of token slots and for the reply's max_new_tokens, so the "
                        "bytes it holds per token in use are a little above the exact figure.")
    return result


def _probe_all(ctx: BenchContext, systems: list[str], tokens: int) -> list[dict[str, Any]]:
    children = []
    for system in systems:
        command = [sys.executable, "-m", "chatkv.bench.memory_probe", "--system", system, "--tokens", str(tokens),
                   "--model", ctx.model_spec, "--models-dir", str(ctx.models_dir),
                   "--dtype", str(ctx.bundle.dtype).removeprefix("torch."), "--device", ctx.bundle.device.type,
                   "--threads", str(torch.get_num_threads())]
        children.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    reports = []
    for system, child in zip(systems, children):
        stdout, stderr = child.communicate(timeout=600)
        if child.returncode != 0:
            raise RuntimeError(f"the {system} memory probe failed ({child.returncode}): {stderr.strip()[-2000:]}")
        reports.append(json.loads(stdout.strip().splitlines()[-1]))
    return reports


def _tables(figures: dict[str, Any], budget: int) -> list[Table]:
    rss = Table("memory: one process serving one conversation", ["system", "session tokens", "peak loading (MiB)",
                                                                "RSS after load (MiB)", "peak serving (MiB)", "KV held (MiB)"])
    for system, label in SYSTEMS.items():
        for row in figures[system]["by_tokens"]:
            held = row.get("kv_bytes_held")
            rss.add(label, fmt(row["session_tokens"]), fmt(row["peak_rss_loading_bytes"] / MIB),
                    fmt(row["rss_after_load_bytes"] / MIB), fmt(row["peak_rss_serving_bytes"] / MIB),
                    fmt(held / MIB if held is not None else None))
    fit = Table(f"memory: sessions that fit the KV budget ({budget / MIB:,.0f} MiB)",
                ["session tokens", "KV per session (MiB)", "sessions that fit"])
    for row in figures["budget_fit"]:
        fit.add(fmt(row["session_tokens"]), fmt(row["kv_bytes_per_session"] / MIB), fmt(row["sessions_fit"]))
    return [rss, fit]
