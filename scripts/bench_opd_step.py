"""Full OPD step time per backend combination, on the real toy pair, through the real command.

    python scripts/bench_opd_step.py [--steps 12] [--warmup 2] [--combos NAME …]

Each combination is one `python -m opd_exp train …` run (default toy recipe: 16 prompts × n = 4,
sampled-token OPD, log-ratio reward; no eval, no logging), launched like a user would. The step
time is rollout/seconds + teacher/seconds + train/seconds of each logged step (rank 0's for
several ranks, whose metrics are the mean over ranks); the first `--warmup` steps are dropped
and the median of the rest is reported, with the job's wall clock (start-up included).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMBOS = {
    "hf + torch": [],
    "vllm + torch": ["rollout=vllm", "rollout.max_model_len=512"],
    "hf + torch, teacher vllm": ["teacher=vllm", "teacher.max_model_len=512"],
    "hf + deepspeed ZeRO-2 ×2": ["learner=deepspeed", "launcher.nproc_per_node=2"],
    "vllm + deepspeed ZeRO-2 ×2": ["rollout=vllm", "rollout.max_model_len=512", "learner=deepspeed",
                                   "launcher.nproc_per_node=2"],
    "vllm + deepspeed ZeRO-3 ×2": ["rollout=vllm", "rollout.max_model_len=512", "learner=deepspeed",
                                   "learner.zero_stage=3", "launcher.nproc_per_node=2"],
}


def run(name: str, steps: int, warmup: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix="opd_bench_step_"))
    cmd = [sys.executable, "-m", "opd_exp", "train", *COMBOS[name], f"trainer.steps={steps}",
           "eval.every=0", "logger.mode=disabled", "logger.plots=false", "trainer.save_every=0",
           f"hydra.run.dir={out}"]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"{name} failed:\n{p.stderr[-3000:]}")
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if r["step"] > warmup]
    med = lambda k: statistics.median(r[k] for r in recs)  # noqa: E731
    parts = {k: med(k) for k in ("rollout/seconds", "teacher/seconds", "train/seconds")}
    return {"name": name, "wall_s": wall, "step_s": statistics.median(
        r["rollout/seconds"] + r["teacher/seconds"] + r["train/seconds"] for r in recs), **parts}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--combos", nargs="+", default=list(COMBOS), choices=list(COMBOS))
    a = ap.parse_args()
    print("| rollout + learner (ranks) | step s (median) | rollout s | teacher s | train s | job wall s |")
    print("|---|---|---|---|---|---|")
    for name in a.combos:
        r = run(name, a.steps, a.warmup)
        print(f"| {name} | {r['step_s']:.2f} | {r['rollout/seconds']:.2f} | {r['teacher/seconds']:.2f}"
              f" | {r['train/seconds']:.2f} | {r['wall_s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
