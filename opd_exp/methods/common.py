"""Small tensor helpers the objectives share."""

from __future__ import annotations

import torch

from opd_exp.core.types import upcast  # noqa: F401  (re-exported: methods use it from here)


def masked_quantiles(x_B_T: torch.Tensor, mask_B_T: torch.Tensor, prefix: str) -> dict[str, float]:
    vals = x_B_T[mask_B_T > 0].float()
    if vals.numel() == 0:  # same keys on every rank (reduced over ranks), no value
        return {f"{prefix}_{k}": float("nan") for k in ("mean", "min", "max", "p01", "p50", "p99")}
    q = torch.quantile(vals, torch.tensor([0.01, 0.5, 0.99], device=vals.device))
    return {f"{prefix}_mean": vals.mean().item(), f"{prefix}_min": vals.min().item(),
            f"{prefix}_max": vals.max().item(), f"{prefix}_p01": q[0].item(),
            f"{prefix}_p50": q[1].item(), f"{prefix}_p99": q[2].item()}


def early_min(r_B_T: torch.Tensor, mask_B_T: torch.Tensor, positions: int) -> float:
    early = mask_B_T.bool() & (torch.arange(r_B_T.shape[1], device=mask_B_T.device) < positions)
    return r_B_T[early].min().item() if early.any() else float("nan")
