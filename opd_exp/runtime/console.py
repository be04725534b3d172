"""What a person watching a run sees: its run dir first, a progress bar with ETA over the steps
(tqdm, on a terminal; plain step lines otherwise, as in CI logs), and a summary at the end."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path


def quiet_libraries() -> None:
    """No library noise in a run's output: weight-loading bars, matplotlib's font INFO,
    DeepSpeed's accelerator guess on a CPU-only machine (warnings stay: a checkpoint with missing
    weights must still be seen)."""
    import torch
    import transformers

    xpu = getattr(torch, "xpu", None)
    if not torch.cuda.is_available() and not (xpu is not None and xpu.is_available()):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # said, not guessed (and warned about)
    transformers.utils.logging.disable_progress_bar()
    for name in ("matplotlib", "matplotlib.font_manager", "DeepSpeed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _fmt(m: dict, key: str, spec: str = ".4f") -> str | None:
    v = m.get(key)
    return None if v is None or not math.isfinite(v) else format(v, spec)


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """`update(step, metrics)` after each step: a tqdm bar on a terminal, else one line a step
    that a cluster log can be read by — the step's fields, its tokens/s, the time since this
    process started training and the ETA of the rest (from the mean step time so far)."""

    def __init__(self, start: int, steps: int, k: int, enabled: bool = True):
        self.k, self.start, self.steps, self.enabled = k, start, steps, enabled
        self.t0 = time.time()
        self.bar = None
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm

            width = shutil.get_terminal_size((100, 20)).columns  # a size-less pty reports 0
            self.bar = tqdm(total=steps, initial=start, unit="step", ncols=width or 100)

    def fields(self, m: dict) -> dict[str, str]:
        """Each number once: the mean reward is left out where it is the loss with its sign
        flipped (sampled-token objectives on their own rollouts)."""
        keys = (("loss", "train/loss", ".4f"), ("grad_norm", "train/grad_norm", ".3g"),
                ("reward", "train/reward_mean", ".4f"), (f"avg@{self.k}", f"eval/avg@{self.k}", ".3f"))
        out = {name: v for name, key, spec in keys if (v := _fmt(m, key, spec)) is not None}
        loss, reward = m.get("train/loss"), m.get("train/reward_mean")
        if "reward" in out and loss is not None and abs(loss + reward) <= 1e-6 * max(1.0, abs(loss)):
            del out["reward"]
        return out

    def restart_clock(self) -> None:
        self.t0 = time.time()

    def timing(self, step: int, m: dict) -> str:
        elapsed = time.time() - self.t0
        done = step - self.start
        eta = elapsed / done * (self.steps - step) if done > 0 else float("nan")
        parts = []
        tokens, secs = m.get("rollout/tokens"), m.get("train/step_seconds")
        if tokens and secs:
            parts.append(f"{tokens / secs:.0f} tok/s")
        parts.append(f"elapsed {_clock(elapsed)}")
        if math.isfinite(eta):
            parts.append(f"eta {_clock(eta)}")
        return " ".join(parts)

    def evaluation(self, m: dict) -> None:
        """The step-0 evaluation (student, or the teacher with `teacher/eval/` metrics), one line."""
        if not self.enabled:
            return
        for who, prefix in (("teacher", "teacher/eval"), ("student", "eval")):
            v, se = m.get(f"{prefix}/avg@{self.k}"), m.get(f"{prefix}/avg@{self.k}_stderr")
            if v is not None:
                line = f"step 0 {who} avg@{self.k} {v:.3f}" + (f" ± {se:.3f}" if se else "")
                p = m.get(f"{prefix}/pass@{self.k}")
                line += f" pass@{self.k} {p:.3f}" if p is not None else ""
                (self.bar.write if self.bar is not None else print)(line)

    def update(self, step: int, m: dict) -> None:
        if not self.enabled:
            return
        f = self.fields(m)
        if self.bar is not None:
            self.bar.set_postfix(f, refresh=False)
            self.bar.update(1)
        else:
            print(f"step {step}/{self.steps} " + " ".join(f"{k} {v}" for k, v in f.items())
                  + " | " + self.timing(step, m), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def summary(run_dir: Path, k: int, seconds: float) -> str:
    """Student Avg@k before → after (± s.e.), the teacher, gap recovery, wall time, and where the
    metrics, plots and the last checkpoint are."""
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    ev = [r for r in recs if r.get(f"eval/avg@{k}") is not None]
    teacher = next((r for r in recs if r.get(f"teacher/eval/avg@{k}") is not None), None)
    lines = [f"done in {seconds / 60:.1f} min: {run_dir}"]
    if ev:
        a, b = ev[0], ev[-1]
        pm = lambda r, p="eval": f"{r[f'{p}/avg@{k}']:.3f} ± {r.get(f'{p}/avg@{k}_stderr') or 0:.3f}"  # noqa: E731
        line = f"  student avg@{k} {pm(a)} (step {a['step']}) → {pm(b)} (step {b['step']})"
        if teacher:
            t = teacher[f"teacher/eval/avg@{k}"]
            line += f"; teacher {pm(teacher, 'teacher/eval')}"
            gap = t - a[f"eval/avg@{k}"]
            if abs(gap) > 1e-9:
                line += f"; gap recovered {(b[f'eval/avg@{k}'] - a[f'eval/avg@{k}']) / gap:.0%}"
        lines.append(line)
    lines.append(f"  metrics {run_dir / 'metrics.jsonl'}, plots {run_dir}/*.png")
    latest = run_dir / "checkpoints" / "latest"
    if latest.exists():
        lines.append(f"  last checkpoint {run_dir / 'checkpoints' / latest.read_text().strip()}")
    return "\n".join(lines)

