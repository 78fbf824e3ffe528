"""``--plot FILE.png``: TTFT per turn (multiturn) and aggregate tok/s against sessions (batching), side by side.

matplotlib is an optional extra (``pip install 'chatkv[plot]'``); the bench checks for it before it
starts, so nobody waits minutes to learn it is missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chatkv.bench.result import ScenarioResult

INSTALL_HINT = "--plot needs matplotlib, which is not installed: pip install 'chatkv[plot]' (or leave out --plot)"


def plotting_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def draw_charts(results: dict[str, ScenarioResult], machine: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    figure, (ttft_axes, scaling_axes) = plt.subplots(1, 2, figsize=(12, 4.8))
    _draw_ttft(ttft_axes, results.get("multiturn"))
    _draw_scaling(scaling_axes, results.get("batching"))
    figure.suptitle(f"chatkv bench: {machine['model']} in {machine['dtype']}, {machine['cores']} cores ({machine['cpu']})",
                    fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _not_measured(axes: Any, what: str, result: ScenarioResult | None) -> None:
    reason = "not run" if result is None else f"{result.status}: {result.reason}"
    axes.text(0.5, 0.5, f"{what}\n({reason})", ha="center", va="center", wrap=True)
    axes.set_axis_off()


def _draw_ttft(axes: Any, result: ScenarioResult | None) -> None:
    if result is None or result.status != "ok":
        _not_measured(axes, "multiturn", result)
        return
    for name, label, marker in (("generate_loop", "transformers chat loop (re-generates)", "o"), ("chatkv", "chatkv", "s")):
        rows = result.figures[name]["per_turn"]
        axes.plot([r["turn"] for r in rows], [r["ttft_ms"] for r in rows], marker=marker, label=label)
    axes.set_xticks([r["turn"] for r in result.figures["chatkv"]["per_turn"]])
    axes.set_xlabel("turn")
    axes.set_ylabel("time to first token (ms)")
    axes.set_title("multiturn: TTFT per turn")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", fontsize=8)


def _draw_scaling(axes: Any, result: ScenarioResult | None) -> None:
    if result is None or result.status != "ok":
        _not_measured(axes, "batching", result)
        return
    for name, label, marker in (("chatkv_continuous", "chatkv, continuous batching", "s"),
                                ("chatkv_prefill_only", "chatkv, prefill-only batching", "^")):
        rows = result.figures[name]["by_sessions"]
        axes.plot([r["sessions"] for r in rows], [r["tok_s"] for r in rows], marker=marker, label=label)
    sequential = result.figures["generate_sequential"]
    axes.axhline(sequential["tok_s"], linestyle="--", color="grey",
                 label=f"model.generate, one session at a time ({sequential['sessions']} sessions)")
    levels = result.parameters["levels"]
    axes.set_xscale("log", base=2)
    axes.set_xticks(levels, [str(level) for level in levels])
    axes.set_xlabel("sessions generating at once")
    axes.set_ylabel("aggregate tokens/s")
    axes.set_title("batching: tok/s vs sessions")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", fontsize=8)
