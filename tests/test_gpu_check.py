"""scripts/gpu_check.py, the check for the first GPU at hand, runs here on the CPU (small
vocabulary): every row it can fill without CUDA, each within its tolerance, and its table."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_gpu_check_runs_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.md"
    p = subprocess.run([sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--small", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    table = out.read_text()
    for check in ("sampled_token: loss", "topk: loss", "full_vocab: loss", "HF rollouts", "torch learner",
                  "DeepSpeed ZeRO-2"):
        assert f"| {check}" in table
    assert "**no**" not in table and table.count("| cpu |") == 9
