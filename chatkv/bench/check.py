"""The exactness check: chatkv's greedy replies against the baseline's, token for token, before any speed is reported.

It runs in fp32 because there the same computation gives the same argmax; in bf16 a different
batch shape or summation order may legitimately flip a near-tie, so timings there are not compared
token by token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class ExactnessCheck:
    what: str  # e.g. "chatkv vs model.generate, fp32 greedy"
    compared: int = 0
    tokens: int = 0
    mismatches: list[dict[str, Any]] = field(default_factory=list)

    def compare(self, label: str, expected: list[int], got: list[int]) -> None:
        self.compared += 1
        self.tokens += len(expected)
        if expected == got:
            return
        position = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
        self.mismatches.append({
            "label": label,
            "position": position,
            "expected": expected[position:position + 5],
            "got": got[position:position + 5],
            "expected_tokens": len(expected),
            "got_tokens": len(got),
        })

    @property
    def passed(self) -> bool:
        return self.compared > 0 and not self.mismatches

    def summary(self) -> str:
        if self.passed:
            return f"passed: {self.compared} sequences, {self.tokens:,} tokens identical ({self.what})"
        first = self.mismatches[0] if self.mismatches else None
        detail = f"; first: {first['label']} differs at token {first['position']}" if first else ""
        return f"FAILED: {len(self.mismatches)} of {self.compared} sequences differ ({self.what}){detail}"

    def to_json(self) -> dict[str, Any]:
        return {"what": self.what, "passed": self.passed, "sequences": self.compared, "tokens": self.tokens,
                "mismatches": self.mismatches, "summary": self.summary()}


def skipped_check(reason: str) -> dict[str, Any]:
    return {"passed": None, "skipped": True, "summary": f"skipped ({reason})"}


def record_check(result: Any, run_check: Callable[[], ExactnessCheck] | None) -> bool:
    """Run the fp32 exactness check (None: skipped with --no-check) into ``result``; False if it failed,
    in which case the scenario is marked check_failed and must not report timings."""
    if run_check is None:
        result.check = skipped_check("--no-check")
        return True
    check = run_check()
    result.check = check.to_json()
    if not check.passed:
        result.status, result.reason = "check_failed", check.summary()
    return check.passed
