"""What diagnostics cost: the toy default step (16 prompts × 4 rollouts, ≤ 96 new tokens) without
diagnostics, with token diagnostics every step (without and with the gradient split), and with
parameter diagnostics every 10 steps.

    python scripts/bench_diagnostics.py [--steps 20] [--threads 2]

Prints a markdown table (docs/benchmarks.md): mean step wall time over the steps
(rollout + teacher + train + diag/seconds + diag/param_seconds, from metrics.jsonl), the run's wall
time, and the ratios to the run without.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from opd_exp.runtime.loggers import read_records

ARMS = {"off": [], "token every step": ["diag.every=1"],
        "token every step + gradient split (4 sequences)": ["diag.every=1", "diag.grad_sequences=4"],
        "token every step + gradient split (8 sequences)": ["diag.every=1", "diag.grad_sequences=8"],
        "param every 10 steps": ["diag.param_every=10"]}


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from opd_exp.__main__ import CONF_DIR
    from opd_exp.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def main() -> None:
    from opd_exp.train import train

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    base = ["logger.mode=disabled", "logger.plots=false", "eval.every=0", "trainer.save_every=0",
            f"trainer.steps={a.steps}", f"trainer.threads={a.threads}"]
    rows = {}
    for name, extra in ARMS.items():
        with tempfile.TemporaryDirectory() as d:
            t0 = time.time()
            train(compose(base + extra), Path(d))
            wall = time.time() - t0
            recs = [r for r in read_records(Path(d) / "metrics.jsonl") if r["step"] > 0]
        per_step = [sum(r.get(k, 0.0) for k in ("rollout/seconds", "teacher/seconds",
                                                "train/seconds", "diag/seconds",
                                                "diag/param_seconds")) for r in recs]
        rows[name] = (statistics.fmean(per_step), wall)
    ref_med, ref_wall = rows["off"]
    print("| diagnostics | mean step (s) | ratio | run wall incl. start-up (s) | ratio |")
    print("|---|---|---|---|---|")
    for name, (med, wall) in rows.items():
        print(f"| {name} | {med:.2f} | {med / ref_med:.2f} | {wall:.1f} | {wall / ref_wall:.2f} |")


if __name__ == "__main__":
    main()
