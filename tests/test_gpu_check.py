"""scripts/gpu_check.py runs end to end in its CPU mode, so the GPU check is not dead code between GPU runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"


@pytest.mark.real_model
def test_gpu_check_quick_cpu_mode_reports_exactness_throughput_and_mixed_lengths(smollm2_dir, tmp_path):
    report_file = tmp_path / "gpu_check.json"
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--model", str(smollm2_dir), "--json", str(report_file)],
        capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    parts = {line["part"]: line for line in json.loads(report_file.read_text()) if line["part"] != "throughput"}
    throughput = [line for line in json.loads(report_file.read_text()) if line["part"] == "throughput"]
    assert parts["machine"]["device"] == "cpu"
    assert parts["exactness"]["exact"] is True and parts["exactness"]["shared_tokens"] > 0
    assert [line["sessions"] for line in throughput] == [1, 2]
    for line in throughput + [parts["mixed_lengths"]["uniform"], parts["mixed_lengths"]["mixed"]]:
        assert line["chatkv_tok_s"] > 0 and line["generate_batched_tok_s"] > 0
    mixed = parts["mixed_lengths"]["mixed"]["prompt_tokens"]
    assert mixed[1] > mixed[0]  # the mixed run really mixed prompt lengths
