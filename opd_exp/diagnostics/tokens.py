"""Token-level overlap between student p and teacher q at student-visited states (SPEC §4).

Per position, with TopK(p) the k most likely tokens of p and ∩ = TopK(p) ∩ TopK(q):
  ratio         |∩| / k
  mass_student  Σ_{v∈∩} p(v)           mass_teacher  Σ_{v∈∩} q(v)
  entropy_gap   |H(q) − H(p)|
  advantage     Σ_{v∈∩} p̄(v) (log q̄(v) − log p̄(v)) = −KL(p̄‖q̄) ≤ 0,  p̄ = p/Σ_∩ p, q̄ = q/Σ_∩ q;
                NaN where ∩ is empty (every mean here skips NaN).
Two paths: `overlap_from_topk` from top-K lists (ids + log-probs under the full softmax; exact but for the
entropies, which become the lumped-tail lower bound `topk_entropy`), and `overlap_exact` from full log-prob rows.
Slots whose log-prob is -inf (a padded vocabulary) are outside the support and never count in ∩.
"""

from __future__ import annotations

import torch

from opd_exp.core.types import upcast

STATS = ("mean", "min", "p10", "p50")


def _plogp(logp: torch.Tensor) -> torch.Tensor:
    """p log p elementwise, 0 where p = 0 (log-prob -inf)."""
    return torch.where(torch.isfinite(logp), logp.exp() * logp, 0.0)


def entropy(logp_N_V: torch.Tensor) -> torch.Tensor:
    """H(p) = −Σ_v p(v) log p(v) over a full log-prob row (-inf entries contribute 0). Returns [N]."""
    return -_plogp(upcast(logp_N_V)).sum(-1)


def topk_entropy(logp_N_K: torch.Tensor) -> torch.Tensor:
    """Entropy from a top-K list: −Σ_K p log p − r log r with r = 1 − Σ_K p the tail mass lumped into one symbol.

    A lower bound of the true entropy (lumping the tail can only lower it); exact when the tail is empty.
    Returns [N].
    """
    logp_N_K = upcast(logp_N_K)
    r_N = (1.0 - logp_N_K.exp().sum(-1)).clamp(min=0.0)
    tiny = torch.finfo(r_N.dtype).tiny
    return -_plogp(logp_N_K).sum(-1) - r_N * r_N.clamp(min=tiny).log()


def overlap_from_topk(p_idx_N_K: torch.Tensor, p_logp_N_K: torch.Tensor,
                      q_idx_N_K: torch.Tensor, q_logq_N_K: torch.Tensor) -> dict[str, torch.Tensor]:
    """Overlap of the student's and the teacher's top-K lists (same K = k on both sides), vectorised over N.

    ratio = |∩|/k, top1 = 1[argmax p = argmax q] (the lists' heads; unlike the set quantities it
    does not saturate when a task's few answer tokens fit in both top-K sets), mass_student = Σ_∩ p,
    mass_teacher = Σ_∩ q,
    advantage = Σ_∩ p̄ (log q̄ − log p̄) with p̄ = p/Σ_∩ p, q̄ = q/Σ_∩ q (NaN where ∩ = ∅),
    entropy_gap = |topk_entropy(q) − topk_entropy(p)| (a difference of lower bounds, not exact).
    Log-probs are under the full softmax; -inf slots are outside the support. Each value is [N].
    """
    if p_idx_N_K.shape != q_idx_N_K.shape or p_logp_N_K.shape != p_idx_N_K.shape \
            or q_logq_N_K.shape != q_idx_N_K.shape:
        raise ValueError(f"top-K lists must share one [N, K] shape, got ids {tuple(p_idx_N_K.shape)} / "
                         f"{tuple(q_idx_N_K.shape)}, log-probs {tuple(p_logp_N_K.shape)} / {tuple(q_logq_N_K.shape)}")
    logp, logq = upcast(p_logp_N_K), upcast(q_logq_N_K)
    k = p_idx_N_K.shape[1]
    match_N_K_K = ((p_idx_N_K[:, :, None] == q_idx_N_K[:, None, :])
                   & torch.isfinite(logp)[:, :, None] & torch.isfinite(logq)[:, None, :])
    in_p_N_K, in_q_N_K = match_N_K_K.any(2), match_N_K_K.any(1)  # slot of p (of q) is in ∩
    n_N = in_p_N_K.sum(1)
    logp_in_N_K = torch.where(in_p_N_K, logp, float("-inf"))
    logq_in_N_K = torch.where(in_q_N_K, logq, float("-inf"))
    log_mass_p_N = logp_in_N_K.logsumexp(1)  # log Σ_∩ p (-inf where ∩ = ∅)
    log_mass_q_N = logq_in_N_K.logsumexp(1)
    # log q(v) moved to the student's slot of v (0 off ∩; where never reads the unmatched -inf entries)
    logq_at_p_N_K = torch.where(match_N_K_K, logq[:, None, :], 0.0).sum(2)
    log_pbar_N_K = logp_in_N_K - log_mass_p_N[:, None]
    log_qbar_N_K = logq_at_p_N_K - log_mass_q_N[:, None]
    term_N_K = torch.where(in_p_N_K, log_pbar_N_K.exp() * (log_qbar_N_K - log_pbar_N_K), 0.0)
    advantage_N = torch.where(n_N > 0, term_N_K.sum(1), float("nan"))
    head_p_N = p_idx_N_K.gather(1, logp.argmax(1, keepdim=True))[:, 0]
    head_q_N = q_idx_N_K.gather(1, logq.argmax(1, keepdim=True))[:, 0]
    return {"ratio": n_N.to(logp.dtype) / k,
            "top1": (head_p_N == head_q_N).to(logp.dtype),
            "mass_student": log_mass_p_N.exp(),
            "mass_teacher": log_mass_q_N.exp(),
            "advantage": advantage_N,
            "entropy_gap": (topk_entropy(logq) - topk_entropy(logp)).abs()}


def overlap_exact(logp_N_V: torch.Tensor, logq_N_V: torch.Tensor, k: int = 16) -> dict[str, torch.Tensor]:
    """Same keys as `overlap_from_topk` from full log-prob rows (log_softmax): the set quantities from the top-k
    of each row through the cheap path, then entropy_gap = |H(q) − H(p)| with the exact entropies.
    The two rows may have different vocabulary sizes (a padded teacher); -inf columns are outside the support.
    """
    logp_N_V, logq_N_V = upcast(logp_N_V), upcast(logq_N_V)
    p_logp, p_idx = logp_N_V.topk(k, dim=-1)
    q_logq, q_idx = logq_N_V.topk(k, dim=-1)
    out = overlap_from_topk(p_idx, p_logp, q_idx, q_logq)
    out["entropy_gap"] = (entropy(logq_N_V) - entropy(logp_N_V)).abs()
    return out


def position_edges(T: int) -> list[int]:
    """Bucket edges over response positions: [0, 1, 2, 4, 8, …], doubling until the last edge is ≥ T.

    Buckets are [0,1), [1,2), [2,4), [4,8), …
    """
    edges = [0, 1]
    while edges[-1] < T:
        edges.append(edges[-1] * 2)
    return edges


def by_position(x_B_T: torch.Tensor, mask_B_T: torch.Tensor, edges: list[int], prefix: str) -> dict[str, float]:
    """Per position bucket [a, b): `{prefix}_pos{a}_{b-1}_{stat}` for stat in mean, min, p10, p50 over the
    masked-in (mask > 0), non-NaN values of x at positions a ≤ t < b; buckets without values are omitted.
    """
    out: dict[str, float] = {}
    for a, b in zip(edges[:-1], edges[1:]):
        x, m = x_B_T[:, a:b], mask_B_T[:, a:b] > 0
        vals = x[m & ~torch.isnan(x)]
        if vals.numel() == 0:
            continue
        vals = vals if vals.is_floating_point() else vals.float()
        q = torch.quantile(vals, torch.tensor([0.1, 0.5], dtype=vals.dtype, device=vals.device))
        for stat, v in zip(STATS, (vals.mean(), vals.min(), q[0], q[1])):
            out[f"{prefix}_pos{a}_{b - 1}_{stat}"] = v.item()
    return out


def masked_mean(x_N: torch.Tensor) -> float:
    """Mean of the non-NaN entries of x (NaN if there are none)."""
    vals = x_N[~torch.isnan(x_N)]
    return vals.mean().item() if vals.numel() else float("nan")


def summarise(d: dict[str, torch.Tensor], prefix: str = "") -> dict[str, float]:
    """NaN-skipping mean of each per-position tensor: key `{prefix}_{key}` (just `key` when prefix is empty)."""
    return {(f"{prefix}_{key}" if prefix else key): masked_mean(x) for key, x in d.items()}
