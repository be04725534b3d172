"""HF teacher backend (`teacher=hf`, the default; every objective): scores the student's rollouts
with the teacher model's forward pass. The vLLM teacher: opd_exp/engines/teacher_vllm.py."""

from __future__ import annotations

import torch

from opd_exp.config.registry import TEACHER_NEEDS
from opd_exp.core.protocols import RolloutBackend, Teacher
from opd_exp.core.types import Rollouts, TeacherScores, micro_slices
from opd_exp.engines.hf_models import load_model
from opd_exp.engines.hf_policy import HFPolicy, topk_and_entropy
from opd_exp.engines.rollout_hf import HFRollout


class HFTeacher:
    """`vocab_size`: the tokenizer's real tokens; the teacher's padded embedding rows past it are
    never scored, never in its top-K (None: every row)."""

    def __init__(self, model: torch.nn.Module, micro_batch_size: int, chunk_size: int,
                 vocab_size: int | None = None, packing: bool = False):
        self.model, self.micro, self.chunk = model.eval(), micro_batch_size, chunk_size
        self.view = HFPolicy(self.model, vocab_size=vocab_size, packing=packing, packing_key="teacher.packing")
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def score(self, rollouts: Rollouts, needs: str, k: int = 0) -> TeacherScores:
        if needs == "none":
            return TeacherScores()
        slices = micro_slices(rollouts.size, self.micro)
        if needs == "sampled":
            return TeacherScores(logp_B_T=torch.cat(
                [self.view.token_logprobs(rollouts.select(s)) for s in slices]))
        if needs == "topk":
            logq, idx, ent, _ = topk_and_entropy(self.view, rollouts, k, self.micro, self.chunk)
            return TeacherScores(topk_logq_B_T_K=logq, topk_idx_B_T_K=idx, entropy_B_T=ent)
        if needs == "hidden":
            hidden = torch.cat([self.view.response_hidden(rollouts.select(s)) for s in slices])
            return TeacherScores(hidden_B_T_H=hidden, lm_head=self.view.lm_head)
        raise ValueError(f"unknown teacher need {needs!r}: one of {TEACHER_NEEDS}")


def make(cfg, tokenizer, stop_ids: set[int],
         device: torch.device | str = "cpu") -> tuple[Teacher, RolloutBackend]:
    """The teacher's scorer and a sampler over the same weights (for the teacher's evaluation and
    off-policy rollouts)."""
    model = load_model(cfg.pair.teacher, "pair.teacher").to(device)
    return (HFTeacher(model, cfg.learner.micro_batch_size, cfg.objective.chunk_size, len(tokenizer),
                      cfg.teacher.packing),
            HFRollout(model, tokenizer, stop_ids, cfg.rollout.batch_size))
