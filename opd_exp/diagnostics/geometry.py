"""Parameter-space geometry of a fine-tuning update (SPEC): per weight matrix W_0 [out, in] (start)
and W_t (current), ΔW = W_t − W_0. Update sparsity (bf16-aware), principal angles of the left
singular subspaces, spectral shift, where the update lands (principal vs low-magnitude entries),
stable rank and Hill tail index of ΔW, subspace similarity of top right singular vectors, and the
row projection for subspace-constrained training. Pure functions on CPU tensors; SVDs in float64.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

__all__ = [
    "unchanged_bf16", "top_right_singular", "principal_cos", "spectral_shift", "mask_overlaps",
    "stable_rank", "hill_alpha", "subspace_similarity", "project_rows", "layer_type",
    "matrix_metrics", "aggregate", "model_matrices",
]

NAN = float("nan")


def _f64(w: torch.Tensor) -> torch.Tensor:
    """A detached float64 copy (bf16/fp16/fp32 inputs upcast) for accurate linear algebra."""
    return w.detach().to(torch.float64)


def _svd(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD in float64: W = U diag(S) Vh, S descending."""
    return torch.linalg.svd(_f64(w), full_matrices=False)


def unchanged_bf16(w0: torch.Tensor, wt: torch.Tensor, eta: float = 1e-3) -> torch.Tensor:
    """Entry unchanged iff |Ŵ − W| ≤ η·max(|W|, |Ŵ|), both cast to bf16 first (compared in fp32)."""
    a = w0.detach().to(torch.bfloat16).float()
    b = wt.detach().to(torch.bfloat16).float()
    return (b - a).abs() <= eta * torch.maximum(a.abs(), b.abs())


def top_right_singular(dw_O_I: torch.Tensor, k: int) -> torch.Tensor:
    """V_K [in, min(k, out, in)]: the top-k right singular vectors of ΔW (float32, orthonormal)."""
    _, _, vh = _svd(dw_O_I)
    return vh[:k].T.contiguous().float()


def _cos_from_u(u0_O_K: torch.Tensor, ut_O_K: torch.Tensor) -> torch.Tensor:
    """cos θ_i = σ_i(U_0ᵀ U_t), descending, clipped to [0, 1] against round-off."""
    return torch.linalg.svdvals(u0_O_K.T @ ut_O_K).clamp(0.0, 1.0)


def principal_cos(w0: torch.Tensor, wt: torch.Tensor, k: int) -> torch.Tensor:
    """Cosines of the principal angles between the top-k left singular subspaces of W_0 and W_t:
    cos θ_i = σ_i(U_0,kᵀ U_t,k), descending; float32 [min(k, out, in)]."""
    u0, ut = _svd(w0)[0], _svd(wt)[0]
    return _cos_from_u(u0[:, :k], ut[:, :k]).float()


def _shift_from_s(s0: torch.Tensor, st: torch.Tensor) -> float:
    """‖σ_t − σ_0‖₂ / ‖σ_0‖₂ (NaN if σ_0 = 0)."""
    den = torch.linalg.vector_norm(s0).item()
    return torch.linalg.vector_norm(st - s0).item() / den if den > 0 else NAN


def spectral_shift(w0: torch.Tensor, wt: torch.Tensor) -> float:
    """Normalised spectral shift ‖σ(W_t) − σ(W_0)‖₂ / ‖σ(W_0)‖₂ over all singular values
    (both sorted descending)."""
    return _shift_from_s(torch.linalg.svdvals(_f64(w0)), torch.linalg.svdvals(_f64(wt)))


def _mask_size(numel: int, fraction: float) -> int:
    """|M| = round(fraction · numel), at least 1 and at most numel."""
    return min(numel, max(1, round(fraction * numel)))


def _overlaps(w0: torch.Tensor, recon: torch.Tensor, updated: torch.Tensor,
              fraction: float) -> tuple[float, float]:
    """(|M_princ ∩ M_upd|, |M_low ∩ M_upd|) / |M_upd| with M_princ = top |recon|, M_low = bottom |W_0|."""
    n_upd = int(updated.sum())
    if n_upd == 0:
        return NAN, NAN
    upd, m = updated.flatten(), _mask_size(w0.numel(), fraction)
    princ = recon.abs().flatten().topk(m).indices
    low = w0.abs().flatten().topk(m, largest=False).indices
    return int(upd[princ].sum()) / n_upd, int(upd[low].sum()) / n_upd


def _rank_r(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> torch.Tensor:
    """The rank-r reconstruction U_r diag(S_r) V_rᵀ."""
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def mask_overlaps(w0: torch.Tensor, wt: torch.Tensor, fraction: float = 0.05, rank: int = 16,
                  eta: float = 1e-3) -> tuple[float, float]:
    """Where the update lands: (|M_princ ∩ M_upd| / |M_upd|, |M_low ∩ M_upd| / |M_upd|).

    M_upd = entries not unchanged (``unchanged_bf16``); M_princ = the top ``fraction`` of entries
    by |U_r S_r V_rᵀ| (rank-r reconstruction of W_0); M_low = the bottom ``fraction`` by |W_0|;
    |M| = round(fraction · numel) (≥ 1). NaN, NaN if nothing was updated."""
    recon = _rank_r(*_svd(w0), rank)
    return _overlaps(_f64(w0), recon, ~unchanged_bf16(w0, wt, eta), fraction)


def _stable_rank_from_s(s: torch.Tensor) -> float:
    """Σ s_i² / s_1² (NaN if all zero)."""
    top = s.max().item() if s.numel() else 0.0
    return (s.square().sum().item() / top**2) if top > 0 else NAN


def stable_rank(dw: torch.Tensor) -> float:
    """Stable rank ‖ΔW‖_F² / ‖ΔW‖₂² (NaN if ΔW = 0)."""
    return _stable_rank_from_s(torch.linalg.svdvals(_f64(dw)))


def hill_alpha(singular_values: torch.Tensor, k: int | None = None) -> float:
    """Hill tail index of s_1 ≥ … ≥ s_n (the positive values, sorted here):
    ξ = (1/k) Σ_{i=1..k} ln(s_i / s_{k+1}), α = 1/ξ. Default k = max(2, n // 4); k is clipped
    to [1, n − 1]. NaN if fewer than 3 positive values or ξ = 0 (flat top of the spectrum)."""
    s = _f64(singular_values).flatten()
    s = s[s > 0].sort(descending=True).values
    n = s.numel()
    if n < 3:
        return NAN
    k = min(max(1, max(2, n // 4) if k is None else k), n - 1)
    xi = torch.log(s[:k] / s[k]).mean().item()
    return 1.0 / xi if xi > 0 else NAN


def subspace_similarity(v_a: torch.Tensor, v_b: torch.Tensor) -> float:
    """Sim_K(a, b) = ‖V_aᵀ V_b‖_F² / K for orthonormal V_a [in, K_a], V_b [in, K_b],
    K = min(K_a, K_b): 1 for the same subspace, ≈ K/d for random ones."""
    k = min(v_a.shape[1], v_b.shape[1])
    return torch.linalg.matrix_norm(_f64(v_a).T @ _f64(v_b)).square().item() / k


def project_rows(g_O_I: torch.Tensor, v_I_K: torch.Tensor) -> torch.Tensor:
    """Project every row of g onto span(V_K): g ← g V_K V_Kᵀ (V_K orthonormal); g's dtype kept."""
    v = v_I_K.to(torch.float32)
    return ((g_O_I.to(torch.float32) @ v) @ v.T).to(g_O_I.dtype)


def layer_type(name: str) -> str:
    """The module kind of an HF parameter name: its second-to-last dotted component
    (``model.layers.3.self_attn.q_proj.weight`` → ``q_proj``, ``lm_head.weight`` → ``lm_head``)."""
    parts = name.split(".")
    return parts[-2] if len(parts) >= 2 else parts[0]


@dataclass(frozen=True)
class StartSpectrum:
    """What the metrics need of W_0's SVD, taken once per run (W_0 never changes): its singular
    values, its top-k left singular vectors and the factors of its rank-r reconstruction —
    (out + in)·max(k, r) numbers, not the whole decomposition."""
    s0: torch.Tensor
    u0_k: torch.Tensor
    us_r: torch.Tensor  # U_r diag(S_r)
    vh_r: torch.Tensor

    def to(self, device) -> "StartSpectrum":
        return StartSpectrum(*(t.to(device) for t in (self.s0, self.u0_k, self.us_r, self.vh_r)))


def start_spectrum(w0: torch.Tensor, k: int = 16, rank: int = 16) -> StartSpectrum:
    u0, s0, vh0 = _svd(w0)
    k = min(k, *w0.shape)
    return StartSpectrum(s0, u0[:, :k].clone(), (u0[:, :rank] * s0[:rank]).clone(), vh0[:rank].clone())


def matrix_metrics(w0: torch.Tensor, wt: torch.Tensor, k: int = 16, eta: float = 1e-3,
                   fraction: float = 0.05, rank: int = 16,
                   start: StartSpectrum | None = None) -> dict[str, float]:
    """All per-matrix geometry numbers for W_0 → W_t (k capped at min(out, in)); one SVD each of
    W_t and ΔW, and of W_0 unless its `start_spectrum(w0, k, rank)` is given. Computed in float64
    on the tensors' device. ``update_rel_norm`` = ‖ΔW‖_F / ‖W_0‖_F."""
    a, b = _f64(w0), _f64(wt)
    k = min(k, *a.shape)
    sp = start if start is not None else start_spectrum(a, k, rank)
    s0 = sp.s0
    ut, st, _ = _svd(b)
    dw = b - a
    s_dw = torch.linalg.svdvals(dw)
    unchanged = unchanged_bf16(w0, wt, eta)
    cos = _cos_from_u(sp.u0_k[:, :k], ut[:, :k])
    princ, low = _overlaps(a, sp.us_r @ sp.vh_r, ~unchanged, fraction)
    w0_norm = torch.linalg.matrix_norm(a).item()
    return {
        "sparsity": unchanged.float().mean().item(),
        "principal_cos_mean": cos.mean().item(),
        "principal_cos_min": cos.min().item(),
        "spectral_shift": _shift_from_s(s0, st),
        "mask_principal": princ,
        "mask_low": low,
        "stable_rank": _stable_rank_from_s(s_dw),
        "hill_alpha": hill_alpha(s_dw),
        "update_rel_norm": torch.linalg.matrix_norm(dw).item() / w0_norm if w0_norm > 0 else NAN,
    }


def aggregate(per_matrix: dict[str, tuple[dict[str, float], int]]) -> dict[str, float]:
    """Parameter-count weighted means: ``<layer_type>/<metric>`` over the matrices of that type and
    ``all/<metric>`` over all, Σ numel·x / Σ numel with NaN values left out (all NaN → NaN)."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for name, (metrics, numel) in per_matrix.items():
        for group in (layer_type(name), "all"):
            for metric, x in metrics.items():
                key = f"{group}/{metric}"
                sums.setdefault(key, 0.0)
                weights.setdefault(key, 0.0)
                if not math.isnan(x):
                    sums[key] += numel * x
                    weights[key] += numel
    return {key: sums[key] / weights[key] if weights[key] > 0 else NAN for key in sums}


def model_matrices(named_params: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The weight matrices (ndim == 2) of ``named_parameters()``, by name; copying is the caller's."""
    return {name: p for name, p in named_params if p.ndim == 2}
