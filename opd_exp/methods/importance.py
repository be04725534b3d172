"""Truncated importance correction where rollouts and learner meet (`rollout.is_cap`).

The tokens were drawn from the rollout engine's π_rollout (vLLM, another numerics, maybe a lagging
copy), not from the learner's p_old that the objective differentiates. Each sampled token gets the
weight w_t = min(p_old(y_t) / π_rollout(y_t), cap); the sampled-token objective multiplies its
advantages by w_t.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from opd_exp.core.types import StepBatch


def truncated_is_weights(batch: StepBatch, cap: float) -> tuple[StepBatch, dict[str, float]]:
    """Sets `batch.is_weight_B_T` from `batch.logp_old_B_T` (learner) and `rollouts.logp_B_T`
    (engine); metrics is_truncated_frac (share of tokens whose ratio exceeds the cap) and
    is_weight_mean, over the batch's valid tokens."""
    mask = batch.mask_B_T
    n = mask.sum().clamp(min=1).item()
    w_B_T = torch.exp(batch.logp_old_B_T - batch.rollouts.logp_B_T)
    metrics = {"is_truncated_frac": ((w_B_T > cap).float() * mask).sum().item() / n}
    w_B_T = w_B_T.clamp(max=cap) * mask
    metrics["is_weight_mean"] = w_B_T.sum().item() / n
    return replace(batch, is_weight_B_T=w_B_T), metrics
