"""Rewards and advantages for the sampled-token estimator (SPEC §1.2), selected by `reward.name`
(the names: opd_exp/config/registry.py REWARDS).

p = student π_θ (the rollout policy, sg), q = teacher π_T, both at the sampled token y_t in
context c_t. Per-token rewards have the sign of log q − log p (positive where the teacher likes
the token more) and become advantages by reward-to-go, A_t = Σ_{t'≥t} γ^{t'−t} r_{t'}.
`verifiable` is a sequence reward (GRPO group advantage, the same for every token of a
response) and `mix` blends the two. Everything is detached; masked positions come out exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from opd_exp.methods.xtok import chunk_rewards


@dataclass
class RewardInputs:
    logq_B_T: torch.Tensor  # teacher log-prob of each sampled token
    logp_B_T: torch.Tensor  # student (rollout policy) log-prob of each sampled token
    mask_B_T: torch.Tensor  # 1.0 on trained tokens
    group_B: torch.Tensor  # prompt index of each row (GRPO groups)
    correct_B: Optional[torch.Tensor] = None  # 1.0 where the response's answer is right
    # element-wise sum over the job's ranks (Dist.sum_tensor): statistics "over the step" cover
    # every rank's tokens; None = this process holds the whole step
    sum_over_ranks: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    # across tokenizers (methods/xtok.py): the chunk of each student token (−1: none) and the
    # credit rule; `logq_B_T` then holds log q(chunk) on each chunk's last student token
    chunk_B_T: Optional[torch.Tensor] = None
    credit: str = "last"

    def step_sum(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.sum_over_ranks is None else self.sum_over_ranks(x)


# ---- per-token rewards r_t ------------------------------------------------------------------

def log_ratio(x: RewardInputs, cfg) -> torch.Tensor:
    """r_t = log q(y_t) − log p(y_t): unbounded (a tail near −50 early in training)."""
    return (x.logq_B_T - x.logp_B_T) * x.mask_B_T


def power(x: RewardInputs, cfg) -> torch.Tensor:
    """PowerOPD Box-Cox reward r_t = (q^α − p^α)/α = BC_α(q) − BC_α(p), BC_α(u) = (u^α − 1)/α.

    In [−1/α, 1/α]; → log q − log p as α → 0; α = 1 is q − p. Computed as
    (expm1(α log q) − expm1(α log p))/α, exact for small α. `scale_by_alpha=false` drops the
    1/α (the authors' public code; range [−1, 1]).
    """
    a = cfg.alpha
    r = torch.expm1(a * x.logq_B_T) - torch.expm1(a * x.logp_B_T)
    return (r / a if cfg.scale_by_alpha else r) * x.mask_B_T


def log_clip(x: RewardInputs, cfg) -> torch.Tensor:
    """Post-hoc stabiliser: clip(log q − log p, −c, c), c = reward.clip."""
    return log_ratio(x, cfg).clamp(-cfg.clip, cfg.clip) * x.mask_B_T


def log_tanh(x: RewardInputs, cfg) -> torch.Tensor:
    """Post-hoc stabiliser: c·tanh((log q − log p)/c), c = reward.clip."""
    return cfg.clip * torch.tanh(log_ratio(x, cfg) / cfg.clip) * x.mask_B_T


def zscore(x: RewardInputs, cfg) -> torch.Tensor:
    """Post-hoc stabiliser: the log-ratio standardised over the step's valid tokens (all ranks)."""
    r, m = log_ratio(x, cfg), x.mask_B_T
    total, n = x.step_sum(torch.stack([r.sum(), m.sum()]))
    n = n.clamp(min=1)
    mean = total / n
    std = x.step_sum((((r - mean) * m) ** 2).sum()).div(n).sqrt()
    return (r - mean) / (std + cfg.eps) * m


TOKEN_REWARDS: dict[str, Callable[[RewardInputs, object], torch.Tensor]] = {
    "log_ratio": log_ratio, "power": power, "log_clip": log_clip, "log_tanh": log_tanh,
    "zscore": zscore}


def reward_to_go(r_B_T: torch.Tensor, gamma: float) -> torch.Tensor:
    """A_t = Σ_{t' ≥ t} γ^{t'−t} r_{t'} along each row (γ = 0: A = r; γ = 1: suffix sum)."""
    if gamma == 0:
        return r_B_T.clone()
    A_B_T = torch.zeros_like(r_B_T)
    running = torch.zeros_like(r_B_T[:, 0])
    for t in range(r_B_T.shape[1] - 1, -1, -1):
        running = r_B_T[:, t] + gamma * running
        A_B_T[:, t] = running
    return A_B_T


# ---- sequence rewards ------------------------------------------------------------------------

def group_advantage(R_B: torch.Tensor, group_B: torch.Tensor, std_normalize: bool,
                    eps: float) -> torch.Tensor:
    """GRPO: (R − mean over the prompt's group) / (std over the group + ε) (std optional)."""
    A_B = torch.zeros_like(R_B)
    for g in group_B.unique():
        sel = group_B == g
        centred = R_B[sel] - R_B[sel].mean()
        if std_normalize:
            std = R_B[sel].std(unbiased=False) if sel.sum() > 1 else torch.zeros(())
            centred = centred / (std + eps)
        A_B[sel] = centred
    return A_B


def _rlvr_advantage(x: RewardInputs, std_normalize: bool, eps: float) -> torch.Tensor:
    if x.correct_B is None:
        raise ValueError("the verifiable reward needs answer correctness of every rollout")
    A_B = group_advantage(x.correct_B.to(x.mask_B_T.dtype), x.group_B, std_normalize, eps)
    return A_B[:, None] * x.mask_B_T


def token_reward(name: str, x: RewardInputs, cfg) -> torch.Tensor:
    """r_t of a per-token reward; across tokenizers the reward of each chunk, credited to its
    student tokens (methods/xtok.py)."""
    fn = TOKEN_REWARDS[name]
    if x.chunk_B_T is None:
        return fn(x, cfg)
    at_chunks = lambda lq, lp, m: fn(replace(x, logq_B_T=lq, logp_B_T=lp, mask_B_T=m), cfg)  # noqa: E731
    return chunk_rewards(at_chunks, x.logq_B_T, x.logp_B_T, x.mask_B_T, x.chunk_B_T, x.credit)[0]


# ---- advantages: what objectives consume -----------------------------------------------------

def advantages(x: RewardInputs, cfg, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_B_T, r_B_T): advantages to weight log p_θ with, and the per-token reward behind them
    (for `verifiable` the sequence reward R spread over the response, for statistics)."""
    name = cfg.name
    if name in TOKEN_REWARDS:
        r = token_reward(name, x, cfg)
        return reward_to_go(r, gamma) * x.mask_B_T, r
    if name == "verifiable":
        R = x.correct_B.to(x.mask_B_T.dtype)[:, None] * x.mask_B_T
        return _rlvr_advantage(x, cfg.std_normalize, cfg.eps), R
    if name == "mix":  # λ·A_OPD + (1 − λ)·A_RLVR, no std normalisation (SPEC §1.2)
        r = token_reward("log_ratio", x, cfg)
        A = cfg.mix_lambda * reward_to_go(r, gamma) + (1 - cfg.mix_lambda) * _rlvr_advantage(
            x, False, cfg.eps)
        return A * x.mask_B_T, r
    raise KeyError(name)
