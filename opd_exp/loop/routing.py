"""Multi-teacher OPD (`pair.teachers`, `pair.routes`): each prompt is scored by the teacher its
tag routes it to — e.g. math prompts to a math teacher, code prompts to a code teacher — and the
student trains on all of them in one batch. A prompt's tag is its toy level ("L1".."L6") or its
row's `data.tag_field`; a tag with no route goes to `pair.teacher`, named "main".

The rows of one step are split by teacher, each teacher scores its rows (its own prompt rendering
with pair.teacher_prompt=own), and the scores are put back in row order: the objective sees one
batch as with one teacher. Metrics per teacher: `teacher/<name>/share` (its share of the step's
sequences) and `teacher/<name>/seconds`; with sampled-token scores `teacher/<name>/logq_mean`
(the mean log-prob it gives the student's tokens on its rows).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import Callable

import torch

from opd_exp.core.protocols import Teacher
from opd_exp.core.types import Problem, Rollouts, TeacherScores


@dataclass
class Teachers:
    scorers: dict[str, Teacher]  # "main" (pair.teacher) and every pair.teachers entry
    routes: dict[str, str]  # tag → teacher name
    encoders: dict[str, Callable[[str], list[int]]]  # pair.teacher_prompt=own: each one's rendering

    def name(self, problem: Problem) -> str:
        return self.routes.get(problem.tag, "main")

    def prompt_ids(self, problem: Problem) -> list[int]:
        """The prompt as the routed teacher renders it (pair.teacher_prompt=own)."""
        return self.encoders[self.name(problem)](problem.prompt)

    def score(self, problems: list[Problem], rollouts: Rollouts, needs: str,
              k: int) -> tuple[TeacherScores, dict[str, float]]:
        """Scores of every row, each from the teacher of the problem it answers (rollouts.group_B)."""
        B = rollouts.response_ids_B_T.shape[0]
        names_B = [self.name(problems[g]) for g in rollouts.group_B.tolist()]
        merged: dict[str, torch.Tensor] = {}
        metrics = {}
        for name, scorer in self.scorers.items():
            rows = [b for b, x in enumerate(names_B) if x == name]
            # the same keys on every rank, whether or not this one had rows for the teacher (NaN
            # is left out of the mean over ranks)
            metrics[f"teacher/{name}/share"] = len(rows) / B
            metrics[f"teacher/{name}/seconds"] = 0.0
            if needs == "sampled":
                metrics[f"teacher/{name}/logq_mean"] = float("nan")
            if not rows:
                continue
            idx = torch.tensor(rows, device=rollouts.response_ids_B_T.device)
            t0 = time.time()
            part = scorer.score(rollouts.select(idx), needs, k)
            metrics[f"teacher/{name}/seconds"] = time.time() - t0
            for f in fields(part):
                value = getattr(part, f.name)
                if torch.is_tensor(value):
                    if f.name not in merged:
                        merged[f.name] = value.new_zeros((B, *value.shape[1:]))
                    merged[f.name][idx.to(value.device)] = value
            if needs == "sampled":
                mask = rollouts.response_mask_B_T[idx].to(part.logp_B_T.device)
                metrics[f"teacher/{name}/logq_mean"] = ((part.logp_B_T * mask).sum()
                                                       / mask.sum().clamp(min=1)).item()
        return TeacherScores(**merged), metrics
