"""Teacher backends: score the student's rollouts. `hf` runs the teacher model's forward pass;
`vllm` (opd_exp/teacher_vllm.py) scores with a vLLM engine's prompt log-probs."""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from opd_exp.batch import Rollouts, TeacherScores
from opd_exp.learner import micro_slices
from opd_exp.models import load_model
from opd_exp.rollout import HFRollout, RolloutBackend
from opd_exp.objectives import response_hidden, token_logprobs, upcast

NEEDS = ("none", "sampled", "topk", "hidden")


class Teacher(Protocol):
    def score(self, rollouts: Rollouts, needs: str, k: int = 0) -> TeacherScores:
        """`needs` is the objective's `teacher_needs` (one of NEEDS); `k` the top-K size."""


class HFTeacher:
    def __init__(self, model: torch.nn.Module, micro_batch_size: int, chunk_size: int):
        self.model, self.micro, self.chunk = model.eval(), micro_batch_size, chunk_size
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def score(self, rollouts: Rollouts, needs: str, k: int = 0) -> TeacherScores:
        if needs == "none":
            return TeacherScores()
        slices = micro_slices(rollouts.size, self.micro)
        if needs == "sampled":
            return TeacherScores(logp_B_T=torch.cat(
                [token_logprobs(self.model, rollouts.select(s)) for s in slices]))
        hidden = torch.cat([response_hidden(self.model, rollouts.select(s)) for s in slices])
        head = self.model.get_output_embeddings()
        if needs == "hidden":
            return TeacherScores(hidden_B_T_H=hidden, lm_head=head)
        if needs == "topk":  # one chunk of positions through the LM head at a time
            vals, idx = [], []
            for c in range(0, hidden.shape[1], self.chunk):
                logq = torch.log_softmax(upcast(head(hidden[:, c:c + self.chunk])), -1)
                v, i = logq.topk(k, dim=-1)
                vals.append(v)
                idx.append(i)
            return TeacherScores(topk_logq_B_T_K=torch.cat(vals, 1), topk_idx_B_T_K=torch.cat(idx, 1))
        raise ValueError(f"unknown teacher need {needs!r}: one of {NEEDS}")


def _make_hf(cfg, tokenizer, stop_ids, device) -> tuple[Teacher, RolloutBackend]:
    model = load_model(cfg.pair.teacher, "pair.teacher").to(device)
    return (HFTeacher(model, cfg.learner.micro_batch_size, cfg.objective.chunk_size),
            HFRollout(model, tokenizer, stop_ids, cfg.rollout.batch_size))


def _make_vllm(cfg, tokenizer, stop_ids, device) -> tuple[Teacher, RolloutBackend]:
    from opd_exp.teacher_vllm import make_vllm_teacher  # imports vLLM only when asked for

    return make_vllm_teacher(cfg, tokenizer, stop_ids)


BACKENDS: dict[str, Callable[..., Teacher]] = {"hf": _make_hf, "vllm": _make_vllm}
NEEDS_BY_BACKEND = {"hf": NEEDS, "vllm": ("none", "sampled", "topk")}


def make_teacher(cfg, tokenizer, stop_ids: set[int],
                 device: torch.device | str = "cpu") -> tuple[Teacher, RolloutBackend]:
    """The teacher's scorer and a sampler over the same weights (for the teacher's evaluation and
    off-policy rollouts), so a big vLLM teacher is never also loaded in HF. Scores come back on
    the device of the rollouts given to `score`."""
    return BACKENDS[cfg.teacher.backend](cfg, tokenizer, stop_ids, device)
