"""Teacher top-K local support matching (SPEC §1.4): a reverse KL truncated to a support of K
tokens per position, one chunk of positions at a time."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from opd_exp.config.registry import teacher_needs
from opd_exp.core.protocols import PolicyView
from opd_exp.core.types import StepBatch
from opd_exp.methods.common import upcast
from opd_exp.methods.full_vocab import GradientInForward, plain_linear, with_autograd
from opd_exp.methods.head_logprobs import chunk_positions
from opd_exp.methods.uld import ULD_LOSSES, uld_summed


class FusedSupportLoss(GradientInForward):
    """Σ_chunks f(logits_S_C, *extra_C) where logits_S = W[idx] h are the student's logits on a
    support of K token ids per position (the teacher's top-K), with the LM head fused in as
    full_vocab's FusedHeadLoss: each chunk's gradient w.r.t. its [B, C, K] logits, g, is formed
    in the forward pass; dL/dh_C = Σ_k g_k W[idx_k] is kept and dL/dW gets g_k h_C added to the
    rows idx_k in place (index_add_ into one [V, H] buffer). No dense [V, H] temporary per chunk
    (what indexing's backward builds) and nothing recomputed."""

    @staticmethod
    def forward(ctx, h_B_T_H, W_V_H, idx_B_T_K, fn, chunk, *extra_B_T):
        grad_h = torch.zeros_like(h_B_T_H)
        grad_W = torch.zeros_like(W_V_H) if W_V_H.requires_grad else None
        total = h_B_T_H.new_zeros((), dtype=torch.promote_types(h_B_T_H.dtype, torch.float32))
        loss_and_grad = with_autograd(fn)
        acc = torch.promote_types(W_V_H.dtype, torch.float32)
        for c in range(0, h_B_T_H.shape[1], chunk):
            h_C, idx_C = h_B_T_H[:, c:c + chunk], idx_B_T_K[:, c:c + chunk]
            W_S = W_V_H[idx_C]  # [B, C, K, H]: the chunk's one temporary of that size
            loss_c, g_C = loss_and_grad((W_S @ h_C[..., None])[..., 0], *[x[:, c:c + chunk] for x in extra_B_T])
            total += loss_c
            g32_C, g_C = g_C, g_C.to(W_V_H.dtype)  # g32: as the loss formed it (float32 or wider)
            grad_h[:, c:c + chunk] = (g_C[..., None, :] @ W_S)[..., 0, :]  # Σ_k g_k W[idx_k]
            if grad_W is None:
                continue
            if W_V_H.dtype == acc:  # rows g_k h_C, written over W_S (no longer needed), added in place
                grad_W.index_add_(0, idx_C.reshape(-1),
                                  torch.mul(g_C[..., None], h_C[:, :, None, :], out=W_S).flatten(0, 2))
            else:  # low precision: a chunk's rows summed in float32 first, then added once
                rows, where = idx_C.reshape(-1).unique(return_inverse=True)
                part = W_V_H.new_zeros(len(rows), W_V_H.shape[1], dtype=acc)
                part.index_add_(0, where, (g32_C[..., None].to(acc) * h_C[:, :, None, :]).flatten(0, 2))
                grad_W.index_add_(0, rows, part.to(grad_W.dtype))
        ctx.save_for_backward(grad_h, grad_W)
        ctx.n_extra = len(extra_B_T)
        return total


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

    def __init__(self, objective_cfg, reward_cfg, temperature: float, ranks=None):
        o = objective_cfg
        self.k, self.support, self.renorm = o.k, o.support, o.renormalize
        self.gradient, self.weight, self.chunk = o.gradient, o.weight, o.chunk_size
        self.temperature = temperature
        self.teacher_needs = teacher_needs(o)

    def prepare(self, batch: StepBatch) -> tuple[StepBatch, dict[str, float]]:
        return batch, {}

    def _support(self, logits_s, logq_full, idx_t, logq_topk=None):
        """(idx_B_C_S, valid_B_C_S) of the support; duplicates / non-members are invalid."""
        if self.support == "teacher":
            return idx_t, torch.isfinite(logq_topk)
        idx_s = logits_s.detach().topk(self.k, -1).indices
        if self.support == "student":
            return idx_s, torch.ones_like(idx_s, dtype=torch.bool)
        idx_t = logq_full.topk(self.k, -1).indices
        s_in_t = (idx_s[..., :, None] == idx_t[..., None, :]).any(-1)
        if self.support == "intersection":
            return idx_s, s_in_t
        return torch.cat([idx_t, idx_s], -1), torch.cat([torch.ones_like(s_in_t), ~s_in_t], -1)

    def _chunk_loss(self, head_s, head_t, vocab, h_s_C, mask_C, *teacher_C):
        if self.support == "teacher" and self.renorm and plain_linear(head_s):
            # only the K support rows of the LM head are needed: [B, C, K] logits, never [B, C, V]
            logq_S, idx = teacher_C
            W_S = head_s.weight[idx]  # [B, C, K, H]
            logp_S = upcast((W_S @ h_s_C[..., None])[..., 0]) / self.temperature
            valid = torch.isfinite(logq_S)  # a teacher that returned fewer than K: not in S_t
        else:
            logits_s = upcast(head_s(h_s_C)[..., :vocab]) / self.temperature
            if self.support == "teacher":
                logq_topk, idx_t = teacher_C
                logq_full = None
            else:
                logq_full = torch.log_softmax(upcast(head_t(teacher_C[0])[..., :vocab]), -1)
                logq_topk = idx_t = None
            idx, valid = self._support(logits_s, logq_full, idx_t, logq_topk)
            # renormalised: only the support's logits enter (no full-vocabulary normaliser, so
            # no gradient, not even a rounding error, reaches tokens outside S_t)
            logp_S = (logits_s if self.renorm else torch.log_softmax(logits_s, -1)).gather(-1, idx)
            logq_S = logq_topk if logq_full is None else logq_full.gather(-1, idx)
        return self._support_loss(logp_S, logq_S, valid, mask_C)

    def _support_loss(self, logp_S, logq_S, valid, mask_C):
        neg = lambda x: torch.finfo(x.dtype).min / 4  # noqa: E731  (each in its own dtype)
        logp_S, logq_S = logp_S.masked_fill(~valid, neg(logp_S)), logq_S.masked_fill(~valid, neg(logq_S))
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

    def loss(self, policy: PolicyView, mb: StepBatch, n_tokens: float) -> tuple[torch.Tensor, dict]:
        t = mb.teacher
        if t.xtok_loss in ULD_LOSSES:  # across tokenizers, the GOLD ablations (methods/uld.py)
            total, n = uld_summed(policy.lm_head, policy.response_hidden(mb.rollouts), mb.mask_B_T,
                                  t.topk_logq_B_T_K, t.topk_exact_B_T_K, t.xtok_loss == "uld_hybrid",
                                  self.temperature, policy.vocab_size, self.chunk)
            loss = total / n_tokens
            return loss, {"loss": loss.item(), "support_size": float(n) / n_tokens}
        teacher_parts = ((t.topk_logq_B_T_K, t.topk_idx_B_T_K) if self.support == "teacher"
                         else (t.hidden_B_T_H,))
        total, support = self.summed(policy.lm_head, t.lm_head, policy.response_hidden(mb.rollouts),
                                     mb.mask_B_T, teacher_parts, policy.vocab_size)
        loss = total / n_tokens
        return loss, {"loss": loss.item(), "support_size": float(support) / n_tokens}

    def summed(self, head_s, head_t, h_s_B_T_H, mask_B_T, teacher_parts, vocab: int | None = None):
        """(Σ_t m_t loss_t, Σ_t m_t |S_t|), one chunk of positions at a time (recomputed in
        backward); `teacher_parts` = (top-K log q, top-K ids) or (teacher hidden states,); only
        the first `vocab` rows of each head are tokens (the teacher's top-K ids are below it).
        The teacher's support with renormalisation under a plain LM head, when a gradient is
        wanted: fused (FusedSupportLoss), never a dense [V, H] temporary."""
        if (torch.is_grad_enabled() and self.support == "teacher" and self.renorm
                and plain_linear(head_s)):
            logq_B_T_K, idx_B_T_K = teacher_parts
            valid = torch.isfinite(logq_B_T_K)
            fn = lambda logits_S, mask_C, logq_S: self._support_loss(  # noqa: E731
                upcast(logits_S) / self.temperature, logq_S, torch.isfinite(logq_S), mask_C)[0]
            total = FusedSupportLoss.apply(h_s_B_T_H, head_s.weight, idx_B_T_K, fn, self.chunk,
                                           mask_B_T, logq_B_T_K)
            return total, (valid.sum(-1) * mask_B_T).sum()
        total, support = 0.0, 0.0
        fn = lambda *a: self._chunk_loss(head_s, head_t, vocab, *a)  # noqa: E731
        chunk = chunk_positions(h_s_B_T_H.shape[0], vocab or getattr(head_s, "out_features", 0), self.chunk)
        for c in range(0, h_s_B_T_H.shape[1], chunk):  # [B, C, V] logits a chunk
            parts = [x[:, c:c + chunk] for x in (h_s_B_T_H, mask_B_T, *teacher_parts)]
            l_c, s_c = (checkpoint(fn, *parts, use_reentrant=False) if torch.is_grad_enabled()
                        else fn(*parts))
            total, support = total + l_c, support + s_c
        return total, support
