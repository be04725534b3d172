"""Teacher backends: score the student's rollouts. `hf` runs the teacher model's forward pass."""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from opd_exp.batch import Rollouts, TeacherScores
from opd_exp.learner import micro_slices
from opd_exp.objectives import token_logprobs


class Teacher(Protocol):
    def score(self, rollouts: Rollouts, needs: str) -> TeacherScores:
        """`needs` is the objective's `teacher_needs` ("sampled": log q of each sampled token)."""


class HFTeacher:
    def __init__(self, model: torch.nn.Module, micro_batch_size: int):
        self.model, self.micro = model.eval(), micro_batch_size
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def score(self, rollouts: Rollouts, needs: str) -> TeacherScores:
        if needs != "sampled":
            raise NotImplementedError(f"the hf teacher does not provide {needs!r} scores yet")
        logq = torch.cat([token_logprobs(self.model, rollouts.select(s))
                          for s in micro_slices(rollouts.size, self.micro)])
        return TeacherScores(logp_B_T=logq)


def _make_hf(cfg, model) -> Teacher:
    return HFTeacher(model, cfg.learner.micro_batch_size)


BACKENDS: dict[str, Callable[..., Teacher]] = {"hf": _make_hf}


def make_teacher(cfg, model) -> Teacher:
    return BACKENDS["hf"](cfg, model)
