"""ULD and GOLD's hybrid as ablations of cross-tokenizer top-K OPD (`xtok.loss=uld|uld_hybrid`,
docs/objectives.md "Across tokenizers"), on the same rollouts and positions as LSM.

At each chunk's first token (the positions where both models predict the next bytes after the
same prefix), p = the student's full softmax over its vocabulary, q = the teacher's top-K
probabilities over its own (under its full softmax).

    uld         Σ_k |sort↓(p)_k − sort↓(q)_k| over the first K entries: which token is which is
                thrown away (Universal Logit Distillation, as TRL's GOLDTrainer computes it with
                `use_uld_loss`, there over both whole vocabularies; here over the teacher's top-K)
    uld_hybrid  w · JSD_β=½ over the teacher tokens whose bytes are a student token (p and q at
                those ids, unnormalised, 0·log 0 = 0; two entries spelled as one student token each
                meet p of that token) + (1 − w) · the sorted L1 over the rest
                (the teacher's unmatched top-K against the student's top-K outside the matched
                ids); w = the matched share of the K entries (GOLD's adaptive weight, over its
                top-K here)
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from opd_exp.methods.common import upcast
from opd_exp.methods.head_logprobs import chunk_positions

ULD_LOSSES = ("uld", "uld_hybrid")


def sorted_l1(p_N_V: torch.Tensor, q_N_K: torch.Tensor) -> torch.Tensor:
    """Σ_k |sort↓(p)_k − sort↓(q)_k| over the K largest of p against q sorted."""
    K = q_N_K.shape[-1]
    return (p_N_V.topk(K, -1).values - q_N_K.sort(-1, descending=True).values).abs().sum(-1)


def uld_position_loss(logp_N_V: torch.Tensor, logq_N_K: torch.Tensor, exact_N_K: torch.Tensor,
                      hybrid: bool) -> torch.Tensor:
    """[N]: the loss at N positions. `logq_N_K`: the teacher's top-K log-probs (−inf: no entry);
    `exact_N_K`: the student id whose bytes equal each entry's teacher token, −1 if none."""
    p, q = logp_N_V.exp(), torch.where(torch.isfinite(logq_N_K), logq_N_K.exp(), torch.zeros_like(logq_N_K))
    if not hybrid:
        return sorted_l1(p, q)
    matched = (exact_N_K >= 0) & (q > 0)
    p_m = torch.where(matched, p.gather(-1, exact_N_K.clamp(min=0)), torch.zeros_like(q))
    q_m = torch.where(matched, q, torch.zeros_like(q))
    m = (p_m + q_m) / 2
    xlogy = lambda a, b: torch.where(a > 0, a * (a.clamp(min=1e-30).log() - b.clamp(min=1e-30).log()),  # noqa: E731
                                     torch.zeros_like(a))
    jsd = (0.5 * xlogy(p_m, m) + 0.5 * xlogy(q_m, m)).sum(-1)
    hit = torch.zeros_like(p).scatter_add(-1, exact_N_K.clamp(min=0), matched.to(p.dtype))
    p_rest = p.masked_fill(hit > 0, 0.0)  # the student outside the matched ids
    l1 = sorted_l1(p_rest, torch.where(matched, torch.zeros_like(q), q))
    w = matched.to(q.dtype).sum(-1) / q.shape[-1]
    return w * jsd + (1 - w) * l1


def uld_summed(head, h_B_T_H: torch.Tensor, mask_B_T: torch.Tensor, logq_B_T_K: torch.Tensor,
               exact_B_T_K: torch.Tensor, hybrid: bool, temperature: float, vocab: int | None,
               chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ of the loss over the masked positions with a teacher entry, their count); the student's
    logits `chunk` positions at a time, recomputed in backward."""
    at = (mask_B_T > 0) & torch.isfinite(logq_B_T_K).any(-1)
    h_N_H, logq_N_K, exact_N_K = h_B_T_H[at], logq_B_T_K[at], exact_B_T_K[at]

    def part(h, lq, ex):
        logp = torch.log_softmax(upcast(head(h)[..., :vocab]) / temperature, -1)
        return uld_position_loss(logp, lq, ex, hybrid).sum()
    # a micro-batch with no such position still touches the head: a loss with a graph (0), the
    # same parameters reduced on every rank
    total = (head(h_B_T_H[:1, :1]).sum() * 0.0).float()
    chunk = chunk_positions(1, vocab or getattr(head, "out_features", 0), chunk)  # [C, V] logits a chunk
    for c in range(0, h_N_H.shape[0], chunk):
        args = (h_N_H[c:c + chunk], logq_N_K[c:c + chunk], exact_N_K[c:c + chunk])
        total = total + (checkpoint(part, *args, use_reentrant=False) if torch.is_grad_enabled() else part(*args))
    return total, at.sum()
