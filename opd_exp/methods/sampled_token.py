"""Sampled-token OPD (SPEC §1.1): policy gradient on a per-token reward (opd_exp/methods/rewards.py).

p = student (the learner), q = teacher; both at the sampled token y_t.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from opd_exp.core.protocols import PolicyView
from opd_exp.core.ranks import Dist
from opd_exp.core.types import StepBatch
from opd_exp.methods.common import early_min, masked_quantiles
from opd_exp.methods.rewards import RewardInputs, advantages
from opd_exp.methods.xtok import chunk_rewards


class SampledTokenOPD:
    """Policy gradient on a per-token reward (SPEC §1.1): the "vanilla OPD" estimator.

    r_t = reward(log q(y_t), log p_old(y_t)); A_t = Σ_{t'≥t} γ^{t'−t} r_{t'} (sg);
    ρ_t = exp(log p_θ − log p_old);  loss = −(1/N) Σ_t m_t min(ρ_t A_t, clip(ρ_t, 1−ε, 1+ε_h) A_t).
    For fresh rollouts (first update on a batch) ρ = 1 and the gradient is the REINFORCE one,
    −(1/N) Σ m_t A_t ∇log p_θ(y_t); the logged loss is then −mean(A).

    Where the step set a truncated importance weight w_t (`batch.is_weight_B_T`: rollout-engine
    correction, opd_exp/methods/importance.py), A_t is multiplied by it.
    """
    teacher_needs = "sampled"
    needs_old_logp = True

    def __init__(self, objective_cfg, reward_cfg, temperature: float, ranks: Dist | None = None):
        """`ranks`: the job's ranks, for rewards standardised over the whole step (zscore)."""
        self.reward_cfg, self.ranks = reward_cfg, ranks
        self.gamma = objective_cfg.gamma
        self.clip_low = objective_cfg.clip_eps
        self.clip_high = objective_cfg.clip_eps_high or objective_cfg.clip_eps
        self.temperature = temperature

    def prepare(self, batch: StepBatch) -> tuple[StepBatch, dict[str, float]]:
        mask = batch.mask_B_T
        logq, logp = batch.teacher.logp_B_T, batch.logp_old_B_T
        chunk = batch.teacher.chunk_B_T  # a teacher with another tokenizer: chunk log-ratios
        x = RewardInputs(logq, logp, mask, batch.rollouts.group_B, batch.correct_B,
                         None if self.ranks is None else self.ranks.sum_tensor,
                         chunk, batch.teacher.credit)
        A_B_T, r_B_T = advantages(x, self.reward_cfg, self.gamma)
        n = mask.sum().clamp(min=1).item()
        if batch.is_weight_B_T is not None:
            A_B_T = A_B_T * batch.is_weight_B_T
        metrics = masked_quantiles(r_B_T, mask, "reward")
        metrics["reward_early_min"] = early_min(r_B_T, mask, self.reward_cfg.early_positions)
        if chunk is None:
            metrics["kl_sampled"] = ((logp - logq) * mask).sum().item() / n
        else:  # Σ over the counted chunks of log p(c) − log q(c), per token
            kl_B_T, _ = chunk_rewards(lambda lq, lp, m: (lp - lq) * m, logq, logp, mask, chunk, "last")
            metrics["kl_sampled"] = kl_B_T.sum().item() / n
        metrics["advantage_mean"] = A_B_T.sum().item() / n
        return replace(batch, advantages_B_T=A_B_T), metrics

    def loss(self, policy: PolicyView, mb: StepBatch, n_tokens: float) -> tuple[torch.Tensor, dict]:
        mask, A = mb.mask_B_T, mb.advantages_B_T
        logp = policy.token_logprobs(mb.rollouts, self.temperature)
        ratio = torch.exp(logp - mb.logp_old_B_T) * mask
        clipped = ratio.clamp(1 - self.clip_low, 1 + self.clip_high)
        per_token = -torch.minimum(ratio * A, clipped * A) * mask
        loss = per_token.sum() / n_tokens
        with torch.no_grad():  # tokens whose loss is the clipped term (PPO's clip fraction)
            clip_frac = ((clipped * A) < (ratio * A)).float().mul(mask).sum() / n_tokens
        return loss, {"loss": loss.item(), "clip_frac": clip_frac.item()}
