"""Markdown table comparing finished runs from their metrics.jsonl.

    python scripts/compare_runs.py NAME=RUN_DIR [NAME=RUN_DIR …] [--k 8] [--baseline NAME]

Columns: mean and median pre-clip gradient norm over all steps (and the baseline's mean divided
by each run's), reward min (mean over steps of reward/min), Avg@k at step 0 and at the last eval
(± standard error), Pass@k at the last eval, and the teacher's Avg@k.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from opd_exp.runtime.plots import read_metrics, series


def summarise(run: Path, k: int) -> dict:
    recs = read_metrics(run / "metrics.jsonl")
    _, gn = series(recs, "train/grad_norm")
    _, rmin = series(recs, "reward/min")
    steps, avg = series(recs, f"eval/avg@{k}")
    _, se = series(recs, f"eval/avg@{k}_stderr")
    _, pas = series(recs, f"eval/pass@{k}")
    _, teacher = series(recs, f"teacher/eval/avg@{k}")
    return {"steps": steps[-1], "gn_mean": statistics.fmean(gn), "gn_median": statistics.median(gn),
            "rmin": statistics.fmean(rmin) if rmin else float("nan"),
            "avg0": avg[0], "se0": se[0], "avg": avg[-1], "se": se[-1], "pass": pas[-1],
            "teacher": teacher[0] if teacher else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="NAME=RUN_DIR")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--baseline", default=None, help="NAME whose mean grad norm the others divide")
    a = ap.parse_args()
    rows = {name: summarise(Path(path), a.k) for name, path in (r.split("=", 1) for r in a.runs)}
    base = rows[a.baseline or next(iter(rows))]["gn_mean"]
    k = a.k
    print(f"| run | steps | grad norm mean | median | baseline mean / this | reward/min (mean) "
          f"| avg@{k} step 0 | avg@{k} last | pass@{k} last | teacher avg@{k} |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['steps']} | {r['gn_mean']:.4g} | {r['gn_median']:.4g} | "
              f"{base / r['gn_mean']:.3g}× | {r['rmin']:.3g} | {r['avg0']:.3f} ± {r['se0']:.3f} | "
              f"{r['avg']:.3f} ± {r['se']:.3f} | {r['pass']:.3f} | {r['teacher']:.3f} |")


if __name__ == "__main__":
    main()
