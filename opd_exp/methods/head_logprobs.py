"""log p(y_t) of the sampled tokens from final hidden states and the LM head, a chunk of positions
at a time: never the [B, T, V] logits that `model(...).logits` materialises (with V = 151,936 and
4k-token responses that tensor, upcast to float32, is the largest of a sampled-token step).

p = softmax(z / τ) is the policy's (student's or teacher's) next-token distribution, z = h Wᵀ its
logits over the first `vocab` rows of W (padded rows past the tokenizer never enter). Forward:
log p(y_t) = z_t[y_t] / τ − logsumexp(z_t / τ), keeping only the logsumexp per position. Backward,
given g_t = ∂L/∂log p(y_t), recomputes each chunk's logits and uses
    ∂L/∂z_t = (g_t / τ) · (onehot(y_t) − p_t),
then ∂L/∂h = (∂L/∂z) W and ∂L/∂W += (∂L/∂z)ᵀ h, accumulated in one [V_rows, H] buffer of the
weights' dtype (as fused linear cross-entropy kernels do: a float32 one would hold 2x a bf16
head's gradient more; summing bf16 over 32 chunks measured 0.0070 relative error against float64,
one matmul over all positions 0.0026 — tests/test_head_logprobs.py).
"""

from __future__ import annotations

import torch

from opd_exp.core.types import upcast


class HeadTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_B_T_H, W_rows_H, ids_B_T, temperature: float, vocab: int | None, chunk: int):
        W_V_H = W_rows_H[:vocab]
        B, T, _ = h_B_T_H.shape
        out_B_T = h_B_T_H.new_empty((B, T), dtype=torch.promote_types(h_B_T_H.dtype, torch.float32))
        lse_B_T = torch.empty_like(out_B_T)
        for c in range(0, T, chunk):
            z = upcast(h_B_T_H[:, c:c + chunk] @ W_V_H.T)
            if temperature != 1.0:
                z = z.div_(temperature)
            lse_B_T[:, c:c + chunk] = torch.logsumexp(z, -1)
            out_B_T[:, c:c + chunk] = z.gather(-1, ids_B_T[:, c:c + chunk, None])[..., 0]
        ctx.save_for_backward(h_B_T_H, W_rows_H, ids_B_T, lse_B_T)
        ctx.temperature, ctx.vocab, ctx.chunk = temperature, vocab, chunk
        return out_B_T - lse_B_T

    @staticmethod
    def backward(ctx, g_B_T):
        h_B_T_H, W_rows_H, ids_B_T, lse_B_T = ctx.saved_tensors
        tau, chunk = ctx.temperature, ctx.chunk
        W_V_H = W_rows_H[:ctx.vocab]
        grad_h = torch.empty_like(h_B_T_H) if ctx.needs_input_grad[0] else None
        grad_W_rows = torch.zeros_like(W_rows_H) if ctx.needs_input_grad[1] else None
        grad_W = None if grad_W_rows is None else grad_W_rows[:ctx.vocab]
        for c in range(0, h_B_T_H.shape[1], chunk):
            h_C = h_B_T_H[:, c:c + chunk]
            z = upcast(h_C @ W_V_H.T)
            if tau != 1.0:
                z = z.div_(tau)
            g_C = g_B_T[:, c:c + chunk].to(z.dtype) / tau
            dz = z.sub_(lse_B_T[:, c:c + chunk, None]).exp_().mul_(-g_C[..., None])  # −g p, in z's buffer
            dz.scatter_add_(-1, ids_B_T[:, c:c + chunk, None], g_C[..., None])  # + g onehot(y)
            dz = dz.to(W_V_H.dtype)
            if grad_h is not None:
                grad_h[:, c:c + chunk] = dz @ W_V_H
            if grad_W is not None:
                grad_W.addmm_(dz.flatten(0, 1).T, h_C.flatten(0, 1))
        return grad_h, grad_W_rows, None, None, None, None


# logits per chunk (B × positions × V): 128 MiB of float32 — 220 positions of one sequence at
# V = 151,936, the whole batch at once for a small vocabulary (docs/benchmarks.md: smaller chunks
# are slower on the CPU, 64 positions took 1.8× the unchunked time, 256 positions 1.2×)
CHUNK_ELEMENTS = 1 << 25


def chunk_positions(rows: int, vocab: int, most: int | None = None) -> int:
    """Positions per LM-head chunk of `rows` sequences: as many as CHUNK_ELEMENTS logits allow
    (one position at least), and at most `most` (objective.chunk_size) — so a real vocabulary
    (V = 151,936: 3 positions of 64 sequences) never holds [B, 64, V] logits at once. `vocab`
    None or 0 (a head whose width is not known before it runs): `most`."""
    if not vocab:
        return most or 1
    n = max(1, CHUNK_ELEMENTS // max(1, rows * vocab))
    return n if most is None else max(1, min(most, n))


def head_token_logprobs(h_B_T_H: torch.Tensor, head: torch.nn.Linear, ids_B_T: torch.Tensor,
                        temperature: float = 1.0, vocab: int | None = None,
                        chunk: int | None = None) -> torch.Tensor:
    """log softmax(h Wᵀ / τ)[y] at every position: [B, T] (see the module doc); `chunk`
    positions at a time (None: as many as CHUNK_ELEMENTS logits allow)."""
    V = head.weight.shape[0] if vocab is None else vocab
    chunk = chunk or chunk_positions(h_B_T_H.shape[0], V)
    return HeadTokenLogprobs.apply(h_B_T_H, head.weight, ids_B_T, temperature, vocab, chunk)
