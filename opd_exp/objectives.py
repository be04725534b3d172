"""Objectives: what the learner minimises (SPEC §1), selected by name from OBJECTIVES.

An objective has two small steps:
- `prepare(batch)`, once per rollout batch, no gradient: per-token rewards, advantages, and their
  statistics over the whole step (returns `(batch, metrics)`);
- `loss(model, mb, n_tokens)`, per micro-batch with gradient: the micro-batch's share of the
  step loss, already divided by `n_tokens` = valid tokens of the whole optimizer step, so the
  learner just sums `backward()`s. Its metrics are additive over micro-batches likewise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Callable, Optional, Protocol

import torch

from torch.utils.checkpoint import checkpoint

from opd_exp.batch import Rollouts, TeacherScores
from opd_exp.rewards import SEQUENCE_REWARDS, RewardInputs, advantages


@dataclass
class StepBatch:
    rollouts: Rollouts
    teacher: TeacherScores
    logp_old_B_T: Optional[torch.Tensor] = None  # learner's log-probs before the update
    advantages_B_T: Optional[torch.Tensor] = None
    correct_B: Optional[torch.Tensor] = None  # 1.0 where the response's answer is right

    @property
    def mask_B_T(self) -> torch.Tensor:
        return self.rollouts.response_mask_B_T

    def select(self, idx) -> "StepBatch":
        return replace(self, **{f.name: getattr(self, f.name)[idx] if torch.is_tensor(
            getattr(self, f.name)) else getattr(self, f.name).select(idx)
            for f in fields(self) if getattr(self, f.name) is not None})


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits to float32 before any softmax; float32/float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def token_logprobs(model: torch.nn.Module, r: Rollouts, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) of each response token under `model`: [B, T].

    Only the T + 1 last positions go through the LM head (HF `logits_to_keep`); the last is
    dropped because it predicts the token after the response.
    """
    T = r.response_ids_B_T.shape[1]
    logits_B_T_V = model(input_ids=r.input_ids_B_L, attention_mask=r.attention_mask_B_L,
                         position_ids=r.position_ids_B_L, logits_to_keep=T + 1,
                         use_cache=False).logits[:, :-1]
    logits_B_T_V = upcast(logits_B_T_V)
    if temperature != 1.0:
        logits_B_T_V = logits_B_T_V / temperature
    picked_B_T = logits_B_T_V.gather(-1, r.response_ids_B_T[..., None])[..., 0]
    return (picked_B_T - torch.logsumexp(logits_B_T_V, -1)) * r.response_mask_B_T


def response_hidden(model: torch.nn.Module, r: Rollouts) -> torch.Tensor:
    """Final hidden states at the positions that predict the response tokens: [B, T, H]
    (the LM head is applied later, a chunk of positions at a time)."""
    out = model.base_model(input_ids=r.input_ids_B_L, attention_mask=r.attention_mask_B_L,
                           position_ids=r.position_ids_B_L, use_cache=False)
    return out.last_hidden_state[:, r.prompt_ids_B_P.shape[1] - 1:-1]


class Objective(Protocol):
    teacher_needs: str  # none | sampled | topk | hidden (see TeacherScores)
    needs_old_logp: bool
    needs_correctness: bool

    def prepare(self, batch: StepBatch) -> tuple[StepBatch, dict[str, float]]: ...

    def loss(self, model, mb: StepBatch, n_tokens: float) -> tuple[torch.Tensor, dict]: ...


def _masked_quantiles(x_B_T: torch.Tensor, mask_B_T: torch.Tensor, prefix: str) -> dict[str, float]:
    vals = x_B_T[mask_B_T > 0].float()
    if vals.numel() == 0:  # same keys on every rank (reduced over ranks), no value
        return {f"{prefix}_{k}": float("nan") for k in ("mean", "min", "max", "p01", "p50", "p99")}
    q = torch.quantile(vals, torch.tensor([0.01, 0.5, 0.99], device=vals.device))
    return {f"{prefix}_mean": vals.mean().item(), f"{prefix}_min": vals.min().item(),
            f"{prefix}_max": vals.max().item(), f"{prefix}_p01": q[0].item(),
            f"{prefix}_p50": q[1].item(), f"{prefix}_p99": q[2].item()}


def _early_min(r_B_T: torch.Tensor, mask_B_T: torch.Tensor, positions: int) -> float:
    early = mask_B_T.bool() & (torch.arange(r_B_T.shape[1], device=mask_B_T.device) < positions)
    return r_B_T[early].min().item() if early.any() else float("nan")


class SampledTokenOPD:
    """Policy gradient on a per-token reward (SPEC §1.1): the "vanilla OPD" estimator.

    r_t = reward(log q(y_t), log p_old(y_t)); A_t = Σ_{t'≥t} γ^{t'−t} r_{t'} (sg);
    ρ_t = exp(log p_θ − log p_old);  loss = −(1/N) Σ_t m_t min(ρ_t A_t, clip(ρ_t, 1−ε, 1+ε_h) A_t).
    For fresh rollouts (first update on a batch) ρ = 1 and the gradient is the REINFORCE one,
    −(1/N) Σ m_t A_t ∇log p_θ(y_t); the logged loss is then −mean(A).

    Rollout-engine correction (`rollout.is_cap` > 0, on-policy rollouts that carry the engine's
    log-probs): the tokens were drawn from the engine's π_rollout, not the learner's p_old, so
    A_t is weighted by the truncated importance ratio w_t = min(p_old(y_t) / π_rollout(y_t), cap).
    """
    teacher_needs = "sampled"
    needs_old_logp = True

    def __init__(self, cfg):
        self.reward_cfg = cfg.reward
        self.needs_correctness = cfg.reward.name in SEQUENCE_REWARDS
        self.gamma = cfg.objective.gamma
        self.clip_low = cfg.objective.clip_eps
        self.clip_high = cfg.objective.clip_eps_high or cfg.objective.clip_eps
        self.temperature = cfg.rollout.temperature
        self.is_cap = cfg.rollout.is_cap if cfg.objective.rollouts_from == "student" else 0.0

    def prepare(self, batch: StepBatch) -> tuple[StepBatch, dict[str, float]]:
        mask = batch.mask_B_T
        logq, logp = batch.teacher.logp_B_T, batch.logp_old_B_T
        x = RewardInputs(logq, logp, mask, batch.rollouts.group_B, batch.correct_B)
        A_B_T, r_B_T = advantages(x, self.reward_cfg, self.gamma)
        n = mask.sum().clamp(min=1).item()
        metrics = {}
        if self.is_cap > 0 and batch.rollouts.logp_B_T is not None:
            w_B_T = torch.exp(logp - batch.rollouts.logp_B_T)
            metrics["is_truncated_frac"] = ((w_B_T > self.is_cap).float() * mask).sum().item() / n
            w_B_T = w_B_T.clamp(max=self.is_cap) * mask
            metrics["is_weight_mean"] = w_B_T.sum().item() / n
            A_B_T = A_B_T * w_B_T
        metrics.update(_masked_quantiles(r_B_T, mask, "reward"))
        metrics["reward_early_min"] = _early_min(r_B_T, mask, self.reward_cfg.early_positions)
        metrics["kl_sampled"] = ((logp - logq) * mask).sum().item() / n
        metrics["advantage_mean"] = A_B_T.sum().item() / n
        return replace(batch, advantages_B_T=A_B_T), metrics

    def loss(self, model, mb: StepBatch, n_tokens: float) -> tuple[torch.Tensor, dict]:
        mask, A = mb.mask_B_T, mb.advantages_B_T
        logp = token_logprobs(model, mb.rollouts, self.temperature)
        ratio = torch.exp(logp - mb.logp_old_B_T) * mask
        clipped = ratio.clamp(1 - self.clip_low, 1 + self.clip_high)
        per_token = -torch.minimum(ratio * A, clipped * A) * mask
        loss = per_token.sum() / n_tokens
        with torch.no_grad():
            clip_frac = ((ratio - clipped).abs() > 0).float().mul(mask).sum() / n_tokens
        return loss, {"loss": loss.item(), "clip_frac": clip_frac.item()}


def divergence(logp_N_V: torch.Tensor, logq_N_V: torch.Tensor, kind: str,
               beta: float = 0.5) -> torch.Tensor:
    """Per-position divergence between student p and teacher q over the vocabulary: [N].

    reverse_kl = Σ_v p (log p − log q);  forward_kl = Σ_v q (log q − log p);
    jsd(β) = β KL(q ‖ m) + (1 − β) KL(p ‖ m), m = (1 − β) p + β q  (TRL's generalised JSD:
    β = 0 is forward KL, β = 1 reverse KL).
    """
    if kind == "jsd" and beta in (0.0, 1.0):
        kind = "forward_kl" if beta == 0.0 else "reverse_kl"
    if kind == "reverse_kl":
        return (logp_N_V.exp() * (logp_N_V - logq_N_V)).sum(-1)
    if kind == "forward_kl":
        return (logq_N_V.exp() * (logq_N_V - logp_N_V)).sum(-1)
    logm = torch.logsumexp(torch.stack([logp_N_V + math.log(1 - beta), logq_N_V + math.log(beta)]), 0)
    return (beta * (logq_N_V.exp() * (logq_N_V - logm)).sum(-1)
            + (1 - beta) * (logp_N_V.exp() * (logp_N_V - logm)).sum(-1))


def _chunked(fn, chunk: int, T: int, *tensors_B_T) -> torch.Tensor:
    """Σ over chunks of positions of fn(*chunk_slices); each chunk is recomputed in backward
    (activation checkpointing), so at most one chunk's [B, C, V] logits live at a time."""
    total = 0.0
    for c in range(0, T, chunk):
        parts = [t[:, c:c + chunk] for t in tensors_B_T]
        total = total + (checkpoint(fn, *parts, use_reentrant=False)
                         if torch.is_grad_enabled() else fn(*parts))
    return total


class FullVocabOPD:
    """Exact divergence over the whole vocabulary with its analytic gradient (SPEC §1.3):
    loss = (1/N) Σ_t m_t D(p(·|c_t), q(·|c_t)), D = objective.divergence (reverse KL default).
    Both models run to final hidden states; the LM heads are applied `chunk_size` positions at
    a time inside the loss, recomputed in backward, so memory does not grow with T·V."""
    teacher_needs = "hidden"
    needs_old_logp = False
    needs_correctness = False

    def __init__(self, cfg):
        o = cfg.objective
        self.kind, self.beta, self.chunk = o.divergence, o.beta, o.chunk_size
        self.temperature = cfg.rollout.temperature

    def prepare(self, batch: StepBatch) -> tuple[StepBatch, dict[str, float]]:
        return batch, {}

    def loss(self, model, mb: StepBatch, n_tokens: float) -> tuple[torch.Tensor, dict]:
        loss = self.summed(model.get_output_embeddings(), mb.teacher.lm_head,
                           response_hidden(model, mb.rollouts), mb.teacher.hidden_B_T_H,
                           mb.mask_B_T) / n_tokens
        return loss, {"loss": loss.item()}

    def summed(self, head_s, head_t, h_s_B_T_H, h_t_B_T_H, mask_B_T) -> torch.Tensor:
        """Σ_t m_t D(p_t, q_t) from final hidden states and LM heads, one chunk at a time."""
        def chunk_loss(logits_s, h_t_C, mask_C):  # logits_s: the student's [B, C, V] logits
            logp = torch.log_softmax(upcast(logits_s) / self.temperature, -1)
            with torch.no_grad():
                logq = torch.log_softmax(upcast(head_t(h_t_C)), -1)
            return (divergence(logp, logq, self.kind, self.beta) * mask_C).sum()

        if _plain_linear(head_s) and torch.is_grad_enabled():
            return FusedHeadLoss.apply(h_s_B_T_H, head_s.weight, chunk_loss, self.chunk,
                                       h_t_B_T_H, mask_B_T)
        return _chunked(lambda h, t, m: chunk_loss(head_s(h), t, m), self.chunk,
                        h_s_B_T_H.shape[1], h_s_B_T_H, h_t_B_T_H, mask_B_T)


class FusedHeadLoss(torch.autograd.Function):
    """Σ_chunks f(h_C W^T, *extra_C) with the LM head fused into the loss (like fused linear
    cross-entropy): the forward computes each chunk's logits, its loss and the loss's gradient
    w.r.t. those logits, g_C, then keeps only dL/dh_C = g_C W and accumulates dL/dW += g_C^T h_C.
    No [B, T, V] tensor exists and nothing is recomputed in backward: the same four matmuls per
    position as an unfused forward + backward."""

    @staticmethod
    def forward(ctx, h_B_T_H, W_V_H, fn, chunk, *extra_B_T):
        grad_h = torch.zeros_like(h_B_T_H)
        grad_W = torch.zeros_like(W_V_H) if W_V_H.requires_grad else None
        total = h_B_T_H.new_zeros(())
        for c in range(0, h_B_T_H.shape[1], chunk):
            h_C = h_B_T_H[:, c:c + chunk]
            with torch.enable_grad():
                logits = (h_C @ W_V_H.T).detach().requires_grad_()
                loss_c = fn(logits, *[x[:, c:c + chunk] for x in extra_B_T])
                (g_C,) = torch.autograd.grad(loss_c, logits)
            total += loss_c.detach()
            g_C = g_C.to(W_V_H.dtype)
            grad_h[:, c:c + chunk] = g_C @ W_V_H
            if grad_W is not None:  # in place: no second [V, H] buffer
                grad_W.addmm_(g_C.flatten(0, 1).T, h_C.flatten(0, 1))
        ctx.save_for_backward(grad_h, grad_W)
        ctx.n_extra = len(extra_B_T)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_W = ctx.saved_tensors  # used once: scale in place
        return (grad_h.mul_(grad_out), None if grad_W is None else grad_W.mul_(grad_out), None, None,
                *([None] * ctx.n_extra))


def _plain_linear(head) -> bool:
    return isinstance(head, torch.nn.Linear) and head.bias is None


class TopKOPD:
    """Local support matching (SPEC §1.4): reverse KL restricted to a support S_t of top-K tokens.

    analytic:  loss_t = Σ_{v∈S_t} p̂(v) (log p̂(v) − log q̂(v)),  p̂, q̂ = softmax over S_t
               (raw p, q when renormalize=false — the ablation that collapses);
    pg:        loss_t = −Σ_{v∈S_t} sg(A_t(v)) log p̂(v),  A_t(v) = −(log p̂(v) − log q̂(v))·w(v),
               w = p̂ (student) | q̂ (teacher) | 1/|S_t| (uniform).
    Nothing flows to tokens outside S_t. With support=teacher only the teacher's top-K log-probs
    are needed; the other supports need its logits (hidden states + head).
    """
    needs_old_logp = False
    needs_correctness = False

    def __init__(self, cfg):
        o = cfg.objective
        self.k, self.support, self.renorm = o.k, o.support, o.renormalize
        self.gradient, self.weight, self.chunk = o.gradient, o.weight, o.chunk_size
        self.temperature = cfg.rollout.temperature
        self.teacher_needs = "topk" if o.support == "teacher" else "hidden"

    def prepare(self, batch: StepBatch) -> tuple[StepBatch, dict[str, float]]:
        return batch, {}

    def _support(self, logits_s, logq_full, idx_t):
        """(idx_B_C_S, valid_B_C_S) of the support; duplicates / non-members are invalid."""
        if self.support == "teacher":
            return idx_t, torch.ones_like(idx_t, dtype=torch.bool)
        idx_s = logits_s.detach().topk(self.k, -1).indices
        if self.support == "student":
            return idx_s, torch.ones_like(idx_s, dtype=torch.bool)
        idx_t = logq_full.topk(self.k, -1).indices
        s_in_t = (idx_s[..., :, None] == idx_t[..., None, :]).any(-1)
        if self.support == "intersection":
            return idx_s, s_in_t
        return torch.cat([idx_t, idx_s], -1), torch.cat([torch.ones_like(s_in_t), ~s_in_t], -1)

    def _chunk_loss(self, head_s, head_t, h_s_C, mask_C, *teacher_C):
        if self.support == "teacher" and self.renorm and _plain_linear(head_s):
            # only the K support rows of the LM head are needed: [B, C, K] logits, never [B, C, V]
            logq_S, idx = teacher_C
            W_S = head_s.weight[idx]  # [B, C, K, H]
            logp_S = upcast((W_S @ h_s_C[..., None])[..., 0]) / self.temperature
            valid = torch.ones_like(idx, dtype=torch.bool)
        else:
            logits_s = upcast(head_s(h_s_C)) / self.temperature
            if self.support == "teacher":
                logq_topk, idx_t = teacher_C
                logq_full = None
            else:
                logq_full = torch.log_softmax(upcast(head_t(teacher_C[0])), -1)
                idx_t = None
            idx, valid = self._support(logits_s, logq_full, idx_t)
            # renormalised: only the support's logits enter (no full-vocabulary normaliser, so
            # no gradient, not even a rounding error, reaches tokens outside S_t)
            logp_S = (logits_s if self.renorm else torch.log_softmax(logits_s, -1)).gather(-1, idx)
            logq_S = logq_topk if logq_full is None else logq_full.gather(-1, idx)
        return self._support_loss(logp_S, logq_S, valid, mask_C)

    def _support_loss(self, logp_S, logq_S, valid, mask_C):
        neg = torch.finfo(logp_S.dtype).min / 4
        logp_S, logq_S = logp_S.masked_fill(~valid, neg), logq_S.masked_fill(~valid, neg)
        if self.renorm:
            logp_S, logq_S = torch.log_softmax(logp_S, -1), torch.log_softmax(logq_S, -1)
        vf = valid.to(logp_S.dtype)
        if self.gradient == "analytic":
            per = (logp_S.exp() * (logp_S - logq_S) * vf).sum(-1)
        else:
            w = {"student": lambda: torch.softmax(logp_S.detach(), -1),
                 "teacher": lambda: logq_S.exp(),
                 "uniform": lambda: vf / vf.sum(-1, keepdim=True).clamp(min=1)}[self.weight]()
            A = (-(logp_S - logq_S) * w).detach()
            per = -(A * logp_S * vf).sum(-1)
        return (per * mask_C).sum(), (vf.sum(-1) * mask_C).sum().detach()

    def loss(self, model, mb: StepBatch, n_tokens: float) -> tuple[torch.Tensor, dict]:
        t = mb.teacher
        teacher_parts = ((t.topk_logq_B_T_K, t.topk_idx_B_T_K) if self.support == "teacher"
                         else (t.hidden_B_T_H,))
        total, support = self.summed(model.get_output_embeddings(), t.lm_head,
                                     response_hidden(model, mb.rollouts), mb.mask_B_T, teacher_parts)
        loss = total / n_tokens
        return loss, {"loss": loss.item(), "support_size": float(support) / n_tokens}

    def summed(self, head_s, head_t, h_s_B_T_H, mask_B_T, teacher_parts):
        """(Σ_t m_t loss_t, Σ_t m_t |S_t|), one chunk of positions at a time (recomputed in
        backward); `teacher_parts` = (top-K log q, top-K ids) or (teacher hidden states,)."""
        total, support = 0.0, 0.0
        fn = lambda *a: self._chunk_loss(head_s, head_t, *a)  # noqa: E731
        for c in range(0, h_s_B_T_H.shape[1], self.chunk):
            parts = [x[:, c:c + self.chunk] for x in (h_s_B_T_H, mask_B_T, *teacher_parts)]
            l_c, s_c = (checkpoint(fn, *parts, use_reentrant=False) if torch.is_grad_enabled()
                        else fn(*parts))
            total, support = total + l_c, support + s_c
        return total, support


class SFT:
    """Token cross-entropy on given traces (SPEC §1.5): loss = −(1/N) Σ_t m_t log p_θ(y_t).
    Used with objective.rollouts_from=teacher (teacher-written traces)."""
    teacher_needs = "none"
    needs_old_logp = False
    needs_correctness = False

    def __init__(self, cfg):
        pass

    def prepare(self, batch: StepBatch) -> tuple[StepBatch, dict[str, float]]:
        return batch, {}

    def loss(self, model, mb: StepBatch, n_tokens: float) -> tuple[torch.Tensor, dict]:
        loss = -token_logprobs(model, mb.rollouts).sum() / n_tokens
        return loss, {"loss": loss.item()}


OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "sampled_token": SampledTokenOPD, "full_vocab": FullVocabOPD, "topk": TopKOPD, "sft": SFT}


def make_objective(cfg) -> Objective:
    return OBJECTIVES[cfg.objective.name](cfg)
