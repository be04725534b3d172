"""scripts/compare_runs.py: seeds aggregated as mean ± std; unfinished runs refused."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts" / "compare_runs.py"


def _run(d: Path, avg0: float, avg: float, gn: list[float], finished: bool = True) -> None:
    d.mkdir(parents=True)
    recs = [{"step": 0, "teacher/eval/avg@8": 0.75},
            {"step": 0, "eval/avg@8": avg0, "eval/avg@8_stderr": 0.01, "eval/pass@8": 0.5}]
    recs += [{"step": i + 1, "train/grad_norm": g, "reward/min": -2.0 * (i + 1)} for i, g in enumerate(gn)]
    recs[-1].update({"eval/avg@8": avg, "eval/avg@8_stderr": 0.02, "eval/pass@8": 0.6,
                     "eval/gap_recovery": (avg - avg0) / (0.75 - avg0)})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    if finished:
        (d / "final_metrics.json").write_text("{}")


def _table(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_seeds_are_mean_and_std(tmp_path):
    finals = [0.3, 0.4, 0.5]
    for s, avg in enumerate(finals):
        _run(tmp_path / "x" / f"seed{s}", 0.25, avg, [1.0, 3.0])
    _run(tmp_path / "one", 0.25, 0.35, [2.0, 2.0])
    out = _table(f"x={tmp_path}/x/seed*", f"one={tmp_path}/one", "--baseline", "one")
    assert out.returncode == 0, out.stderr
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.stdout.splitlines()[2:]}
    x = rows["x"]
    assert x[0] == "3" and x[7] == f"{statistics.fmean(finals):.3f} ± {statistics.stdev(finals):.3f}"
    assert x[2] == "2 ± 0" and x[4] == "-3 ± 0"  # grad norm mean 2, reward/min mean -3
    assert rows["one"][7] == "0.350 ± 0.020"  # one run: ± its evaluation's standard error


def test_an_unfinished_run_is_refused(tmp_path):
    _run(tmp_path / "seed0", 0.25, 0.3, [1.0])
    _run(tmp_path / "seed1", 0.25, 0.3, [1.0], finished=False)
    out = _table(f"x={tmp_path}/seed*")
    assert out.returncode != 0 and "not finished" in out.stderr and "seed1" in out.stderr
