"""Objectives: what the learner minimises (SPEC §1), selected by name from OBJECTIVES.

An objective has two small steps:
- `prepare(batch)`, once per rollout batch, no gradient: per-token rewards, advantages, and their
  statistics over the whole step (returns `(batch, metrics)`);
- `loss(model, mb, n_tokens)`, per micro-batch with gradient: the micro-batch's share of the
  step loss, already divided by `n_tokens` = valid tokens of the whole optimizer step, so the
  learner just sums `backward()`s. Its metrics are additive over micro-batches likewise.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable, Optional, Protocol

import torch

from opd_exp.batch import Rollouts, TeacherScores
from opd_exp.rewards import REWARDS, reward_to_go


@dataclass
class StepBatch:
    rollouts: Rollouts
    teacher: TeacherScores
    logp_old_B_T: Optional[torch.Tensor] = None  # learner's log-probs before the update
    advantages_B_T: Optional[torch.Tensor] = None

    @property
    def mask_B_T(self) -> torch.Tensor:
        return self.rollouts.response_mask_B_T

    def select(self, idx) -> "StepBatch":
        return replace(self, **{f.name: getattr(self, f.name)[idx] if torch.is_tensor(
            getattr(self, f.name)) else getattr(self, f.name).select(idx)
            for f in fields(self) if getattr(self, f.name) is not None})


def token_logprobs(model: torch.nn.Module, r: Rollouts, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) of each response token under `model`: [B, T].

    Only the T + 1 last positions go through the LM head (HF `logits_to_keep`); the last is
    dropped because it predicts the token after the response.
    """
    T = r.response_ids_B_T.shape[1]
    logits_B_T_V = model(input_ids=r.input_ids_B_L, attention_mask=r.attention_mask_B_L,
                         position_ids=r.position_ids_B_L, logits_to_keep=T + 1,
                         use_cache=False).logits[:, :-1]
    if logits_B_T_V.dtype in (torch.float16, torch.bfloat16):
        logits_B_T_V = logits_B_T_V.float()  # log-softmax in at least float32
    if temperature != 1.0:
        logits_B_T_V = logits_B_T_V / temperature
    picked_B_T = logits_B_T_V.gather(-1, r.response_ids_B_T[..., None])[..., 0]
    return (picked_B_T - torch.logsumexp(logits_B_T_V, -1)) * r.response_mask_B_T


class Objective(Protocol):
    teacher_needs: str  # "sampled" (log q of the sampled token); later "topk", "logits"
    needs_old_logp: bool

    def prepare(self, batch: StepBatch) -> tuple[StepBatch, dict[str, float]]: ...

    def loss(self, model, mb: StepBatch, n_tokens: float) -> tuple[torch.Tensor, dict]: ...


def _masked_quantiles(x_B_T: torch.Tensor, mask_B_T: torch.Tensor, prefix: str) -> dict[str, float]:
    vals = x_B_T[mask_B_T > 0].float()
    if vals.numel() == 0:
        return {}
    q = torch.quantile(vals, torch.tensor([0.01, 0.5, 0.99]))
    return {f"{prefix}_mean": vals.mean().item(), f"{prefix}_min": vals.min().item(),
            f"{prefix}_max": vals.max().item(), f"{prefix}_p01": q[0].item(),
            f"{prefix}_p50": q[1].item(), f"{prefix}_p99": q[2].item()}


class SampledTokenOPD:
    """Policy gradient on a per-token reward (SPEC §1.1): the "vanilla OPD" estimator.

    r_t = reward(log q(y_t), log p_old(y_t)); A_t = Σ_{t'≥t} γ^{t'−t} r_{t'} (sg);
    ρ_t = exp(log p_θ − log p_old);  loss = −(1/N) Σ_t m_t min(ρ_t A_t, clip(ρ_t, 1±ε) A_t).
    For fresh rollouts (first update on a batch) ρ = 1 and the gradient is the REINFORCE one,
    −(1/N) Σ m_t A_t ∇log p_θ(y_t); the logged loss is then −mean(A).
    """
    teacher_needs = "sampled"
    needs_old_logp = True

    def __init__(self, cfg):
        self.reward_cfg = cfg.reward
        self.reward_fn = REWARDS[cfg.reward.name]
        self.gamma = cfg.objective.gamma
        self.clip_eps = cfg.objective.clip_eps
        self.temperature = cfg.rollout.temperature

    def prepare(self, batch: StepBatch) -> tuple[StepBatch, dict[str, float]]:
        mask = batch.mask_B_T
        logq, logp = batch.teacher.logp_B_T, batch.logp_old_B_T
        r_B_T = self.reward_fn(logq, logp, mask, self.reward_cfg)
        A_B_T = reward_to_go(r_B_T, self.gamma) * mask
        n = mask.sum().clamp(min=1)
        metrics = _masked_quantiles(r_B_T, mask, "reward")
        metrics["kl_sampled"] = ((logp - logq) * mask).sum().item() / n.item()
        metrics["advantage_mean"] = A_B_T.sum().item() / n.item()
        return replace(batch, advantages_B_T=A_B_T), metrics

    def loss(self, model, mb: StepBatch, n_tokens: float) -> tuple[torch.Tensor, dict]:
        mask, A = mb.mask_B_T, mb.advantages_B_T
        logp = token_logprobs(model, mb.rollouts, self.temperature)
        ratio = torch.exp(logp - mb.logp_old_B_T) * mask
        clipped = ratio.clamp(1 - self.clip_eps, 1 + self.clip_eps)
        per_token = -torch.minimum(ratio * A, clipped * A) * mask
        loss = per_token.sum() / n_tokens
        with torch.no_grad():
            clip_frac = ((ratio - clipped).abs() > 0).float().mul(mask).sum() / n_tokens
        return loss, {"loss": loss.item(), "clip_frac": clip_frac.item()}


OBJECTIVES: dict[str, Callable[..., Objective]] = {"sampled_token": SampledTokenOPD}


def make_objective(cfg) -> Objective:
    return OBJECTIVES[cfg.objective.name](cfg)
