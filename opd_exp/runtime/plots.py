"""PNG curves from a run's metrics.jsonl: gradient norm and Avg@k (student vs teacher)."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [s for s, _ in pts], [v for _, v in pts]


def write_plots(metrics_path: Path, out_dir: Path, k: int = 8) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
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
    return written
