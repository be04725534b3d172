"""Supervised fine-tuning on given traces (SPEC §1.5)."""

from __future__ import annotations

import torch

from opd_exp.core.protocols import PolicyView
from opd_exp.core.types import StepBatch


class SFT:
    """Token cross-entropy on given traces (SPEC §1.5): loss = −(1/N) Σ_t m_t log p_θ(y_t).
    Used with objective.rollouts_from=teacher (teacher-written traces)."""
    teacher_needs = "none"
    needs_old_logp = False
    temperature = 1.0  # traces are scored by the plain softmax, whatever the rollout temperature

    def __init__(self, objective_cfg, reward_cfg, temperature: float, ranks=None):
        pass

    def prepare(self, batch: StepBatch) -> tuple[StepBatch, dict[str, float]]:
        return batch, {}

    def loss(self, policy: PolicyView, mb: StepBatch, n_tokens: float) -> tuple[torch.Tensor, dict]:
        loss = -policy.token_logprobs(mb.rollouts).sum() / n_tokens
        return loss, {"loss": loss.item()}
