"""Full-vocabulary OPD (SPEC §1.3): the exact divergence over the vocabulary, analytic gradient,
with the LM head fused into the loss one chunk of positions at a time (never [B, T, V])."""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from opd_exp.core.protocols import PolicyView
from opd_exp.core.types import StepBatch
from opd_exp.methods.common import upcast
from opd_exp.methods.head_logprobs import chunk_positions
from opd_exp.methods.xtok import first_of_chunk


def divergence(logp_N_V: torch.Tensor, logq_N_V: torch.Tensor, kind: str,
               beta: float = 0.5, keep_N_V: torch.Tensor | None = None) -> torch.Tensor:
    """Per-position divergence between student p and teacher q over the vocabulary: [N].

    reverse_kl = Σ_v p (log p − log q);  forward_kl = Σ_v q (log q − log p);
    jsd(β) = β KL(q ‖ m) + (1 − β) KL(p ‖ m), m = (1 − β) p + β q  (TRL's generalised JSD:
    β = 0 is forward KL, β = 1 reverse KL).
    `keep_N_V` (bool): the support, where both p and q live (`on_support`); the terms of the
    other entries are 0 (their −inf log-probs never meet a product).
    """
    w = None
    if keep_N_V is not None:
        logp_N_V, logq_N_V = logp_N_V.masked_fill(~keep_N_V, 0.0), logq_N_V.masked_fill(~keep_N_V, 0.0)
        w = keep_N_V.to(logp_N_V.dtype)
    on = (lambda x: x) if w is None else (lambda x: x * w)  # noqa: E731
    if kind == "jsd" and beta in (0.0, 1.0):
        kind = "forward_kl" if beta == 0.0 else "reverse_kl"
    if kind == "reverse_kl":
        return on(logp_N_V.exp() * (logp_N_V - logq_N_V)).sum(-1)
    if kind == "forward_kl":
        return on(logq_N_V.exp() * (logq_N_V - logp_N_V)).sum(-1)
    logm = torch.logsumexp(torch.stack([logp_N_V + math.log(1 - beta), logq_N_V + math.log(beta)]), 0)
    return on(beta * logq_N_V.exp() * (logq_N_V - logm)
              + (1 - beta) * logp_N_V.exp() * (logp_N_V - logm)).sum(-1)


def on_support(logits_N_V: torch.Tensor, logq_N_V: torch.Tensor):
    """The support of a teacher whose log q is −inf on some tokens (across tokenizers: a student
    token that no teacher token maps to, methods/xtok.py `mapped_logq`): there the student's
    logit is set to −inf too, so p is renormalised over the support, as q is, and no gradient
    reaches the other tokens. Returns (logits, keep or None where q is finite everywhere)."""
    out = torch.isneginf(logq_N_V)
    if not out.any():
        return logits_N_V, None
    return logits_N_V.masked_fill(out, -torch.inf), ~out


def chunked(fn, chunk: int, T: int, *tensors_B_T) -> torch.Tensor:
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
    teacher_needs = "hidden"  # teacher hidden states + LM head (config/registry.py)
    needs_old_logp = False

    def __init__(self, objective_cfg, reward_cfg, temperature: float, ranks=None):
        o = objective_cfg
        self.kind, self.beta, self.chunk = o.divergence, o.beta, o.chunk_size
        self.temperature = temperature

    def prepare(self, batch: StepBatch) -> tuple[StepBatch, dict[str, float]]:
        return batch, {}

    def loss(self, policy: PolicyView, mb: StepBatch, n_tokens: float) -> tuple[torch.Tensor, dict]:
        t, mask_B_T = mb.teacher, mb.mask_B_T
        if t.chunk_B_T is not None:  # across tokenizers the teacher's distribution, mapped onto the
            # student's ids by its head, is at each chunk's first token only (engines/teacher_xtok.py)
            mask_B_T = mask_B_T * first_of_chunk(t.chunk_B_T)
        loss = self.summed(policy.lm_head, t.lm_head, policy.response_hidden(mb.rollouts),
                           t.hidden_B_T_H, mask_B_T, policy.vocab_size) / n_tokens
        return loss, {"loss": loss.item()}

    def summed(self, head_s, head_t, h_s_B_T_H, h_t_B_T_H, mask_B_T,
               vocab: int | None = None) -> torch.Tensor:
        """Σ_t m_t D(p_t, q_t) from final hidden states and LM heads, one chunk at a time, over the
        first `vocab` rows of each head (padded rows past the tokenizer's vocabulary: never)."""
        def teacher_logq(h_t_C):  # no gradient flows to the teacher: normalised in place
            return log_softmax_(upcast(head_t(h_t_C)[..., :vocab]))

        def chunk_loss(logits_s, h_t_C, mask_C):  # logits_s: the student's [B, C, V] logits
            with torch.no_grad():
                logq = teacher_logq(h_t_C)
            logits_s, keep = on_support(upcast(logits_s) / self.temperature, logq)
            logp = torch.log_softmax(logits_s, -1)
            return (divergence(logp, logq, self.kind, self.beta, keep) * mask_C).sum()

        width = vocab or getattr(head_s, "out_features", 0)  # a teacher head that maps another
        width += 2 * getattr(head_t, "teacher_vocab", 0)  # vocabulary holds about two [C, V_t] more
        chunk = chunk_positions(h_s_B_T_H.shape[0], width, self.chunk)
        if plain_linear(head_s) and torch.is_grad_enabled():
            fn = (with_autograd(chunk_loss) if self.kind != "reverse_kl" else
                  lambda z, h_t_C, m_C: reverse_kl_and_grad(z, teacher_logq(h_t_C), m_C, self.temperature))
            return FusedHeadLoss.apply(h_s_B_T_H, head_s.weight, fn, chunk, vocab,
                                       h_t_B_T_H, mask_B_T)
        return chunked(lambda h, t, m: chunk_loss(head_s(h)[..., :vocab], t, m), chunk,
                       h_s_B_T_H.shape[1], h_s_B_T_H, h_t_B_T_H, mask_B_T)


class GradientInForward(torch.autograd.Function):
    """Base of the fused LM-head losses, whose forward(h, W, a, b, c, *extra) returns the loss
    and saves the gradients it already formed, (dL/dh, dL/dW or None): backward only scales them
    by the incoming gradient (in place: they are used once)."""

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_W = ctx.saved_tensors
        return (grad_h.mul_(grad_out), None if grad_W is None else grad_W.mul_(grad_out), None, None,
                None, *([None] * ctx.n_extra))


def with_autograd(fn):
    """fn(logits, *extra) → loss, made into (logits, *extra) → (loss, its gradient w.r.t. logits)."""
    def loss_and_grad(logits: torch.Tensor, *extra):
        with torch.enable_grad():
            logits = logits.detach().requires_grad_()
            loss_c = fn(logits, *extra)
            (g_C,) = torch.autograd.grad(loss_c, logits)
        return loss_c.detach(), g_C
    return loss_and_grad


def log_softmax_(x: torch.Tensor, budget_bytes: int | None = None) -> torch.Tensor:
    """log_softmax over the last dim, in place, a block of positions at a time so that
    logsumexp's own temporaries stay within `budget_bytes` (default: 2 MiB on the CPU, 64 MiB on a
    GPU, where fewer, larger kernels matter more) instead of the size of `x`; returns `x`."""
    budget = budget_bytes or (64 << 20 if x.is_cuda else 2 << 20)
    rows = max(1, budget // max(1, x.shape[-1] * x.element_size()))
    try:  # [positions, V] view: also of the [..., :vocab] slice of padded logits (never a copy)
        blocks = [x.view(-1, x.shape[-1])]
    except RuntimeError:  # leading dims that cannot merge: one [C, V] view per sequence
        blocks = [b.view(-1, b.shape[-1]) for b in x.unbind(0)]
    for flat in blocks:
        for i in range(0, flat.shape[0], rows):
            flat[i:i + rows] -= torch.logsumexp(flat[i:i + rows], -1, keepdim=True)
    return x


def reverse_kl_and_grad(z_B_C_V: torch.Tensor, logq_B_C_V: torch.Tensor, mask_B_C: torch.Tensor,
                        temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ m_t KL(p_t ‖ q_t), p = softmax(z / T) the student's, q the teacher's, and its gradient
    w.r.t. the student's logits z, in closed form:
        ∂/∂z_v = (m_t / T) · p_v · (log p_v − log q_v − KL(p_t ‖ q_t)).
    Works in place on `z` and `logq` (both consumed): no [B, C, V] buffer besides them, no
    autograd graph. Where log q is −inf (outside the teacher's support: `on_support`) p is 0 and
    so are the terms and the gradient."""
    out = torch.isneginf(logq_B_C_V)
    out = out if out.any() else None
    z = upcast(z_B_C_V).div_(temperature)
    logp = log_softmax_(z if out is None else z.masked_fill_(out, -torch.inf))
    diff = logq_B_C_V.neg_().add_(logp)  # log p − log q, in the teacher's buffer
    if out is not None:
        diff.masked_fill_(out, 0.0)  # (−inf) − (−inf)
    p = logp.exp_()
    kl_B_C = (p[..., None, :] @ diff[..., :, None])[..., 0, 0]  # Σ_v p (log p − log q), no [C, V] product
    g = diff.sub_(kl_B_C[..., None]).mul_(p).mul_((mask_B_C / temperature)[..., None])
    return (kl_B_C * mask_B_C).sum(), g


class FusedHeadLoss(GradientInForward):
    """Σ_chunks f(h_C W^T, *extra_C) with the LM head fused into the loss (like fused linear
    cross-entropy): the forward computes each chunk's logits and hands them to `fn`, which returns
    the chunk's loss and its gradient w.r.t. those logits, g_C (`with_autograd(loss_fn)`, or a
    closed form such as `reverse_kl_and_grad`); it then keeps only dL/dh_C = g_C W and accumulates dL/dW += g_C^T h_C.
    No [B, T, V] tensor exists and nothing is recomputed in backward: the same four matmuls per
    position as an unfused forward + backward. Only the first `vocab` rows of W enter (None: all);
    the rows past it (padding) get an exact zero gradient, in the one [V_rows, H] buffer."""

    @staticmethod
    def forward(ctx, h_B_T_H, W_rows_H, fn, chunk, vocab, *extra_B_T):
        W_V_H = W_rows_H[:vocab]
        grad_h = torch.zeros_like(h_B_T_H)
        grad_W_rows = torch.zeros_like(W_rows_H) if W_rows_H.requires_grad else None
        grad_W = None if grad_W_rows is None else grad_W_rows[:vocab]  # a view into it
        total = h_B_T_H.new_zeros((), dtype=torch.promote_types(h_B_T_H.dtype, torch.float32))
        for c in range(0, h_B_T_H.shape[1], chunk):
            h_C = h_B_T_H[:, c:c + chunk]
            loss_c, g_C = fn(h_C @ W_V_H.T, *[x[:, c:c + chunk] for x in extra_B_T])
            total += loss_c
            g_C = g_C.to(W_V_H.dtype)
            grad_h[:, c:c + chunk] = g_C @ W_V_H
            if grad_W is not None:  # in place: no second [V, H] buffer
                grad_W.addmm_(g_C.flatten(0, 1).T, h_C.flatten(0, 1))
        ctx.save_for_backward(grad_h, grad_W_rows)
        ctx.n_extra = len(extra_B_T)
        return total


def plain_linear(head) -> bool:
    return isinstance(head, torch.nn.Linear) and head.bias is None
