"""``chatkv bench [SCENARIO ...] [--quick] [--json FILE] [--plot FILE.png] [--no-check]``.

Loads the model once, runs each chosen scenario against its plain-transformers baseline in this
process, prints a table per scenario, and writes the bench JSON of docs/contracts.md: ``machine`` and ``scenarios``
(each with its parameters and its measured figures, side by side). A scenario that fails is
reported as such and the others still run; the exit code says whether everything passed.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from chatkv import __version__
from chatkv.bench import scenarios
from chatkv.bench.context import BenchContext
from chatkv.bench.plot import INSTALL_HINT, draw_charts, plotting_available
from chatkv.bench.report import Progress, print_report
from chatkv.bench.result import ScenarioResult
from chatkv.bench.sizes import choose_sizes


def run_bench(context: Any) -> int:
    args = context.args
    if getattr(args, "backend", None):
        from chatkv.bench.remote import run_remote_bench

        return run_remote_bench(context)
    names = list(dict.fromkeys(args.scenarios)) or list(scenarios.NAMES)
    unknown = [name for name in names if name not in scenarios.NAMES]
    if unknown:
        print(f"chatkv bench: unknown scenario {', '.join(unknown)}; choose from {', '.join(scenarios.NAMES)}",
              file=sys.stderr)
        return 2
    if args.plot_path and not plotting_available():
        print(f"chatkv bench: {INSTALL_HINT}", file=sys.stderr)
        return 2

    progress = Progress()
    ctx = _make_context(context, progress)
    if ctx is None:
        return 1
    from chatkv.bench.machine import machine_info

    machine = machine_info(ctx.bundle)
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    started = time.perf_counter()
    results: dict[str, ScenarioResult] = {}
    for name in names:
        progress(f"{name}: starting ({ctx.sizes.label} size)")
        scenario_started = time.perf_counter()
        results[name] = _run_one(name, ctx)
        results[name].seconds = time.perf_counter() - scenario_started
        progress(f"{name}: {results[name].status} in {results[name].seconds:.1f} s")
    ctx.release_fp32_bundle()

    print_report(list(results.values()), machine)
    if args.json_path:
        document = {
            "machine": machine,
            "run": {"chatkv": __version__, "started": started_at, "seconds": round(time.perf_counter() - started, 3),
                    "size": ctx.sizes.label, "scenarios": names, "exactness_check": ctx.check,
                    "command": _command_line(args)},
            "scenarios": {name: result.to_json() for name, result in results.items()},
        }
        Path(args.json_path).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        progress(f"wrote {args.json_path}")
    if args.plot_path:
        draw_charts(results, machine, Path(args.plot_path))
        progress(f"wrote {args.plot_path}")
    failed = [name for name, result in results.items() if result.status in ("check_failed", "error")]
    if failed:
        print(f"chatkv bench: {', '.join(failed)} did not complete; see above", file=sys.stderr)
        return 1
    return 0


def _command_line(args: Any) -> str:
    """The command that reproduces this run (model and dtype as resolved by the config and flags)."""
    parts = ["chatkv", "bench", *args.scenarios]
    for flag, given in (("--quick", args.quick), ("--no-check", args.no_check)):
        if given:
            parts.append(flag)
    for flag in ("model", "dtype", "device", "threads", "quant"):
        value = getattr(args, flag, None)
        if value:
            parts.extend([f"--{flag}", str(value)])
    return " ".join(parts)


def _make_context(context: Any, progress: Progress) -> BenchContext | None:
    import torch
    from transformers.utils import logging as hf_logging

    from chatkv.model.loader import ModelError, load_model
    from chatkv.model.source import ModelSourceError
    from chatkv.paths import ensure_private_dir

    from chatkv.engine.threads import engine_threads

    settings = context.settings
    torch.set_num_threads(engine_threads(settings.model.threads))  # baselines and engine on the same count
    hf_logging.disable_progress_bar()  # weight-loading bars would drown the progress lines
    models_dir = ensure_private_dir(context.paths.models)
    spec = settings.model.model
    progress(f"loading {spec} ({settings.model.dtype} dtype)")
    try:
        bundle = load_model(spec, models_dir, settings.model.dtype, settings.model.device, progress=progress,
                            quant=settings.model.quant)
    except (ModelError, ModelSourceError) as exc:
        print(f"chatkv: {exc}", file=sys.stderr)
        return None
    progress(f"loaded {bundle.model_id} in {bundle.load_seconds:.1f} s ({bundle.fingerprint.dtype}, "
             f"{torch.get_num_threads()} threads)")
    return BenchContext(bundle=bundle, settings=settings, sizes=choose_sizes(context.args.quick),
                        check=not context.args.no_check, progress=progress, models_dir=models_dir, model_spec=spec,
                        llama_bench=getattr(context.args, "llama_bench", None))


def _run_one(name: str, ctx: BenchContext) -> ScenarioResult:
    try:
        return scenarios.runner(name)(ctx)
    except Exception as exc:  # noqa: BLE001 - one broken scenario must not lose the others' figures
        traceback.print_exc(file=sys.stderr)
        return ScenarioResult(name, status="error", reason=f"{type(exc).__name__}: {exc}")
