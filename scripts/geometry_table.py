"""Tables and the overlap plot of sweeps/geometry_toy.sh, from the runs' metrics.jsonl and
diag/locking.json (mean ± std over the seed runs of each arm; unfinished runs refused).

    python scripts/geometry_table.py multirun/geometry_toy [--k 8]
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

import torch
from omegaconf import OmegaConf

from opd_exp.engines.hf_models import load_model
from opd_exp.loop.geometry import block_matrices, mean_similarity
from opd_exp.runtime.plots import read_metrics, series

GEOMETRY = ("sparsity", "principal_cos_mean", "spectral_shift", "stable_rank", "mask_principal",
            "mask_low", "update_rel_norm")
PAPER_SPARSITY = {"sft": "8.1 %", "opd": "51.6 %", "rlvr": "77.2 %"}


def arm_runs(root: Path, arm: str) -> list[Path]:
    runs = sorted((root / arm).glob("seed*"))
    unfinished = [r for r in runs if not (r / "final_metrics.json").exists()]
    if unfinished:
        raise SystemExit(f"unfinished runs (no final_metrics.json): {', '.join(map(str, unfinished))}")
    return runs


def last(recs: list[dict], key: str, i: int = -1) -> float:
    values = series(recs, key)[1]
    return values[i] if values else float("nan")


def early_locking(run: Path) -> float:
    """Sim_K(t, end) at the first stored step (10 of 50 = 20 % of training), parameter-count
    weighted, recomputed from the stored subspaces (files written before the weighting was
    stored hold the bases alone: the weights then come from the run's student model)."""
    files = sorted((run / "diag" / "subspaces").glob("step_*.pt"))
    if not files:
        return float("nan")
    first, end = torch.load(files[0]), torch.load(files[-1])
    if "bases" in end:
        return mean_similarity(first["bases"], end["bases"], end["numel"])
    cfg = OmegaConf.load(run / "config.yaml")
    numel = {n: w.numel() for n, w in block_matrices(load_model(cfg.pair.student, "pair.student")).items()}
    return mean_similarity(first, end, numel)


def mean_sd(values: list[float]) -> str:
    v = [x for x in values if not math.isnan(x)]
    if not v:
        return "–"
    sd = statistics.stdev(v) if len(v) > 1 else float("nan")
    return f"{statistics.fmean(v):.3g} ± {sd:.2g}" if not math.isnan(sd) else f"{v[0]:.3g}"


def row(root: Path, arm: str, k: int) -> dict[str, str]:
    runs = arm_runs(root, arm)
    recs = [read_metrics(r / "metrics.jsonl") for r in runs]
    out = {"arm": arm, "n": str(len(runs))}
    for g in GEOMETRY:
        out[g] = mean_sd([last(x, f"diag/param/all/{g}") for x in recs])
    out["locking@20%"] = mean_sd([early_locking(r) for r in runs])
    out["avg0"] = mean_sd([last(x, f"eval/avg@{k}", 0) for x in recs])
    out["avg"] = mean_sd([last(x, f"eval/avg@{k}") for x in recs])
    return out


def table(rows: list[dict[str, str]], extra: dict[str, str] | None = None) -> str:
    cols = list(rows[0]) + (["paper sparsity"] if extra else [])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = list(r.values()) + ([extra.get(r["arm"], "")] if extra else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def overlap_curves(root: Path, arms: list[str], out: Path) -> str:
    """Mean over seeds of diag/token/mass_teacher, ratio and mass_student by step; a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    lines = ["| arm | metric | " + " | ".join(f"step {s}" for s in (5, 25, 50)) + " |", "|---|---|---|---|---|"]
    for arm in arms:
        recs = [read_metrics(r / "metrics.jsonl") for r in arm_runs(root, arm)]
        for key, style in (("diag/token/mass_teacher", "-"), ("diag/token/ratio", "--"),
                           ("diag/token/mass_student", ":")):
            per = [dict(zip(*series(x, key))) for x in recs]
            steps = sorted(set.intersection(*(set(p) for p in per)))
            mean = [statistics.fmean(p[s] for p in per) for s in steps]
            ax.plot(steps, mean, style, label=f"{arm} {key.split('/')[-1]}")
            by = dict(zip(steps, mean))
            lines.append(f"| {arm} | {key.split('/')[-1]} | " +
                         " | ".join(f"{by.get(s, float('nan')):.3f}" for s in (5, 25, 50)) + " |")
    ax.set(xlabel="step", ylabel="top-16 overlap", ylim=(0, 1.02), title="teacher/student top-K overlap")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", type=Path)
    ap.add_argument("--k", type=int, default=8)
    a = ap.parse_args()
    have = lambda arm: (a.root / arm).is_dir()  # noqa: E731
    trio = [row(a.root, arm, a.k) for arm in ("sft", "opd", "rlvr") if have(arm)]
    if trio:
        print("Geometry (lr 2e-6, 50 steps; last diagnostic step):\n")
        print(table(trio, PAPER_SPARSITY) + "\n")
    constrained = [row(a.root, arm, a.k) for arm in ("opd_free", "opd_constrained", "sft_free",
                                                     "sft_constrained") if have(arm)]
    if constrained:
        print("Subspace constraint (default lr, from step 10 of 50):\n")
        print(table(constrained) + "\n")
    curves = [arm for arm in ("opd_free", "mismatch") if have(arm)]
    if curves:
        print(overlap_curves(a.root, curves, a.root / "overlap.png"))
        print(f"\nplot: {a.root / 'overlap.png'}")


if __name__ == "__main__":
    main()
