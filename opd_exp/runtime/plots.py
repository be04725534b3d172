"""PNG curves from a run's metrics.jsonl: gradient norm, Avg@k (student vs teacher) and, with
diagnostics on, overlap, log-ratio by position and parameter geometry."""

from __future__ import annotations

import json
from pathlib import Path

from opd_exp.runtime.loggers import read_records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [s for s, _ in pts], [v for _, v in pts]


def write_plots(metrics_path: Path, out_dir: Path, k: int = 8) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_records(metrics_path)
    written = []

    fig, ax = plt.subplots(figsize=(6, 3.5))
    x, y = series(records, "train/grad_norm")
    ax.plot(x, y, lw=1)
    ax.set(xlabel="step", ylabel="gradient norm (pre-clip)", yscale="log", title="train/grad_norm")
    fig.tight_layout()
    fig.savefig(out_dir / "grad_norm.png", dpi=100)
    plt.close(fig)
    written.append(out_dir / "grad_norm.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    x, y = series(records, f"eval/avg@{k}")
    _, se = series(records, f"eval/avg@{k}_stderr")
    ax.errorbar(x, y, yerr=se if len(se) == len(y) else None, marker="o", capsize=3,
                label="student")
    tx, ty = series(records, f"teacher/eval/avg@{k}")
    if ty:
        ax.axhline(ty[0], color="C1", ls="--", label="teacher")
    ax.set(xlabel="step", ylabel=f"avg@{k}", title=f"eval/avg@{k} (± 1 s.e.)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / f"avg{k}.png", dpi=100)
    plt.close(fig)
    written.append(out_dir / f"avg{k}.png")
    return written + diag_plots(records, out_dir, plt)


def diag_plots(records: list[dict], out_dir: Path, plt) -> list[Path]:
    """With diagnostics on: top-K overlap by step, the log-ratio by response position at the last
    token-diagnostic step (min / p10 / p50), parameter sparsity and Sim_K(t, end) by step."""
    written = []
    token = [r for r in records if "diag/token/ratio" in r]
    if token:
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.5))
        for key in ("mass_teacher", "mass_student", "ratio", "early_mass_teacher"):
            x, y = series(records, f"diag/token/{key}")
            ax.plot(x, y, label=key)
        ax.set(xlabel="step", ylabel="top-K overlap", ylim=(0, 1.02), title="diag/token/*")
        ax.legend(fontsize=7)
        last = token[-1]
        buckets = sorted({k.split("_pos")[1].rsplit("_", 1)[0] for k in last
                          if k.startswith("diag/token/log_ratio_pos")}, key=lambda b: int(b.split("_")[0]))
        for stat in ("min", "p10", "p50"):
            bx.plot(range(len(buckets)), [last.get(f"diag/token/log_ratio_pos{b}_{stat}") or float("nan")
                                          for b in buckets], marker="o", label=stat)
        bx.set_xticks(range(len(buckets)), buckets, rotation=45, fontsize=7)
        bx.set(xlabel="response position", ylabel="log q − log p",
               title=f"log-ratio by position (step {last['step']})")
        bx.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "diag_tokens.png", dpi=100)
        plt.close(fig)
        written.append(out_dir / "diag_tokens.png")
    if any("diag/param/all/sparsity" in r for r in records):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key in ("sparsity", "principal_cos_mean", "update_rel_norm"):
            ax.plot(*series(records, f"diag/param/all/{key}"), marker="o", label=key)
        locking = out_dir / "diag" / "locking.json"
        if locking.exists():
            sims = json.loads(locking.read_text())
            ax.plot([int(s) for s in sims], list(sims.values()), marker="s", label="Sim_K(t, end)")
        ax.set(xlabel="step", title="diag/param/all/*")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "diag_params.png", dpi=100)
        plt.close(fig)
        written.append(out_dir / "diag_params.png")
    return written
