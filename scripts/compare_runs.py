"""Markdown table comparing finished runs from their metrics.jsonl.

    python scripts/compare_runs.py NAME=RUN_DIR [NAME=RUN_DIR …] [--k 8] [--baseline NAME]
    python scripts/compare_runs.py NAME='multirun/x/*' …        # a glob: one row, mean ± std over seeds

Columns: mean pre-clip gradient norm over all steps (and the baseline's divided by each run's),
reward min and early-position min (means over steps of reward/min, reward/early_min), Avg@k at
step 0 and at the last eval, Pass@k at the last eval, the teacher's Avg@k and the gap recovered
(eval/gap_recovery at the last eval). One run: ± the evaluation's standard error; a glob of n
runs (seeds): mean ± standard deviation over them, and n.
"""

from __future__ import annotations

import argparse
import glob
import math
import statistics
from pathlib import Path

from opd_exp.runtime.plots import read_metrics, series

COLUMNS = ("gn_mean", "rmin", "early_min", "avg0", "avg", "pass", "teacher", "gap")


def summarise(run: Path, k: int) -> dict:
    recs = read_metrics(run / "metrics.jsonl")

    def mean(key: str) -> float:
        values = series(recs, key)[1]
        return statistics.fmean(values) if values else float("nan")

    def last(key: str, i: int = -1) -> float:
        values = series(recs, key)[1]
        return values[i] if values else float("nan")
    return {"steps": max(r["step"] for r in recs), "gn_mean": mean("train/grad_norm"),
            "rmin": mean("reward/min"), "early_min": mean("reward/early_min"),
            "avg0": last(f"eval/avg@{k}", 0), "se0": last(f"eval/avg@{k}_stderr", 0),
            "avg": last(f"eval/avg@{k}"), "se": last(f"eval/avg@{k}_stderr"),
            "pass": last(f"eval/pass@{k}"), "teacher": last(f"teacher/eval/avg@{k}", 0),
            "gap": last("eval/gap_recovery")}


def aggregate(runs: list[Path], k: int) -> dict:
    """One run as is; several: each column's mean, its std in `<column>_sd`, and `n`."""
    rows = [summarise(r, k) for r in runs]
    if len(rows) == 1:
        return {**rows[0], "n": 1}
    out = {"steps": rows[0]["steps"], "n": len(rows)}
    for c in COLUMNS:
        values = [r[c] for r in rows if not math.isnan(r[c])]
        out[c] = statistics.fmean(values) if values else float("nan")
        out[c + "_sd"] = statistics.stdev(values) if len(values) > 1 else float("nan")
    return out


def cell(r: dict, c: str, fmt: str = ".3f") -> str:
    if math.isnan(r[c]):
        return "–"
    spread = r.get(c + "_sd", r.get({"avg0": "se0", "avg": "se"}.get(c, ""), None))
    return f"{r[c]:{fmt}}" + (f" ± {spread:{fmt}}" if spread is not None and not math.isnan(spread) else "")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="NAME=RUN_DIR or NAME=GLOB (seeds)")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--baseline", default=None, help="NAME whose mean grad norm the others divide")
    a = ap.parse_args()
    rows = {}
    for name, pattern in (r.split("=", 1) for r in a.runs):
        runs = sorted(Path(p) for p in glob.glob(pattern) if (Path(p) / "metrics.jsonl").exists())
        if not runs:
            raise SystemExit(f"{name}: no run with a metrics.jsonl matches {pattern!r}")
        unfinished = [str(r) for r in runs if not (r / "final_metrics.json").exists()]
        if unfinished:  # a run still going (or killed) would enter with its step-0 numbers
            raise SystemExit(f"{name}: not finished (no final_metrics.json): {', '.join(unfinished)}")
        rows[name] = aggregate(runs, a.k)
    base = rows[a.baseline or next(iter(rows))]["gn_mean"]
    k = a.k
    print(f"| run | seeds | steps | grad norm mean | baseline / this | reward/min | reward/early_min "
          f"| avg@{k} step 0 | avg@{k} last | pass@{k} last | teacher avg@{k} | gap recovered |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['n']} | {r['steps']} | {cell(r, 'gn_mean', '.4g')} | "
              f"{base / r['gn_mean']:.3g}× | {cell(r, 'rmin', '.3g')} | {cell(r, 'early_min', '.3g')} | "
              f"{cell(r, 'avg0')} | {cell(r, 'avg')} | {cell(r, 'pass')} | {cell(r, 'teacher')} | "
              f"{cell(r, 'gap', '.2f')} |")


if __name__ == "__main__":
    main()
