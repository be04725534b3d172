"""Evaluation during a run: the student on the configured benchmarks, the teacher once."""

from __future__ import annotations

import time

import torch

from opd_exp.core.ranks import Dist
from opd_exp.core.types import Sampling
from opd_exp.data import load_benchmark
from opd_exp.evaluation import evaluate
from opd_exp.loop.seeds import step_seed


class Evaluator:
    """Avg@k / Pass@k on `eval.benchmarks` (opd_exp/evaluation.py), sampled with `eval.*`; each
    call reseeds from (trainer.seed, step), so a resumed run evaluates exactly as a straight one.
    With several ranks each evaluates its share.

    eval/gap_recovery = (Avg_now − Avg_step0) / (Avg_teacher − Avg_step0) (SPEC §3) at every
    student eval once the step-0 student and the teacher were measured (a resumed run `recall`s
    them from its metrics.jsonl)."""

    def __init__(self, eval_cfg, seed: int, tokenizer, encode, dist: Dist = Dist(),
                 teacher_encode=None, teacher_tokenizer=None):
        """`eval.*`; `seed`: trainer.seed; `encode`: prompt text → token ids (the teacher's own
        `teacher_encode` for prefix teacher/eval, when pair.teacher_prompt=own, and its own
        `teacher_tokenizer` where its vocabulary differs from the student's)."""
        self.seed, self.tokenizer, self.encode, self.dist = seed, tokenizer, encode, dist
        self.teacher_encode, self.teacher_tokenizer = teacher_encode, teacher_tokenizer or tokenizer
        self.benchmarks = {b: load_benchmark(b, eval_cfg.max_problems) for b in eval_cfg.benchmarks}
        self.sampling = Sampling.from_cfg(eval_cfg, n=eval_cfg.k)
        self.key = f"avg@{eval_cfg.k}"
        self.before: float | None = None  # the student's Avg@k at step 0
        self.teacher: float | None = None

    def recall(self, records: list[dict]) -> None:
        """The step-0 student and teacher Avg@k of a run being resumed."""
        for r in records:
            if r.get("step") == 0:
                self.teacher = r.get(f"teacher/eval/{self.key}", self.teacher)
                self.before = r.get(f"eval/{self.key}", self.before)

    def __call__(self, rollout, step: int, prefix: str = "eval") -> dict[str, float]:
        if hasattr(rollout, "wait"):  # a sampler running ahead (loop/ahead.py) draws no more
            rollout.wait()
        torch.manual_seed(step_seed(self.seed, step, purpose=1, rank=self.dist.rank))
        t = time.time()
        teacher = prefix.startswith("teacher")
        encode = self.teacher_encode if teacher and self.teacher_encode else self.encode
        scores = evaluate(rollout, self.teacher_tokenizer if teacher else self.tokenizer, encode,
                          self.benchmarks, self.sampling, self.dist)
        out = {f"{prefix}/{k}": v for k, v in scores.items()}
        out[f"{prefix}/seconds"] = time.time() - t
        if prefix == "teacher/eval":
            self.teacher = scores[self.key]
        elif prefix == "eval":
            if step == 0:
                self.before = scores[self.key]
            if self.before is not None and self.teacher is not None and self.teacher != self.before:
                out["eval/gap_recovery"] = (scores[self.key] - self.before) / (self.teacher - self.before)
        return out
