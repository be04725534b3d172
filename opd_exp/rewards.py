"""Per-token rewards for the sampled-token estimator (SPEC §1.2).

p = student π_θ, q = teacher π_T, both evaluated at the sampled token y_t in context c_t.
Every reward has the sign of log q − log p: positive where the teacher likes the token more.
Inputs are detached log-probs [B, T]; masked positions come out exactly 0.
"""

from __future__ import annotations

from typing import Callable

import torch

RewardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, object], torch.Tensor]


def log_ratio(logq_B_T, logp_B_T, mask_B_T, cfg) -> torch.Tensor:
    """r_t = log q(y_t) − log p(y_t): unbounded (a tail near −50 early in training)."""
    return (logq_B_T - logp_B_T) * mask_B_T


def power(logq_B_T, logp_B_T, mask_B_T, cfg) -> torch.Tensor:
    """PowerOPD Box-Cox reward r_t = (q^α − p^α)/α = BC_α(q) − BC_α(p), BC_α(u) = (u^α − 1)/α.

    In [−1/α, 1/α]; → log q − log p as α → 0; α = 1 is q − p. Computed as
    (expm1(α log q) − expm1(α log p))/α, exact for small α. `scale_by_alpha=false` drops the
    1/α (the authors' public code; range [−1, 1]).
    """
    a = cfg.alpha
    r = torch.expm1(a * logq_B_T) - torch.expm1(a * logp_B_T)
    return (r / a if cfg.scale_by_alpha else r) * mask_B_T


REWARDS: dict[str, RewardFn] = {"log_ratio": log_ratio, "power": power}


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
