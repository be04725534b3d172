"""Sequence packing for the learner's forward (`learner.packing`): no compute on padding.

A micro-batch of rollouts is left-padded prompts + right-padded responses, [B, L]. Packed, each
row's real tokens — its prompt without padding, its response up to its last trained position
(later tokens are never trained on) — are laid end to end in rows of at most L tokens (first fit,
longest first), each sequence with its own position ids from 0. With `attention_mask=None`,
`transformers` reads the restarts of the position ids as sequence boundaries and attends only
within a sequence (its packed-sequence mask), so every hidden state is the one the padded batch
gives. `unpack` puts the states that predict response tokens back at [B, T] (zeros where the
padded batch has padding or untrained tail tokens, which the objectives mask out).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd_exp.core.types import Rollouts


@dataclass
class Packed:
    input_ids_R_N: torch.Tensor
    position_ids_R_N: torch.Tensor
    row_B_T: torch.Tensor  # packed row of the state that predicts response token t of row b
    col_B_T: torch.Tensor  # … and its column
    valid_B_T: torch.Tensor  # bool: t is within row b's packed response

    def unpack(self, states_R_N_X: torch.Tensor) -> torch.Tensor:
        """[R, N, X] packed states → [B, T, X], zeros outside the packed responses."""
        out = states_R_N_X[self.row_B_T, self.col_B_T]
        return out * self.valid_B_T[..., None].to(out.dtype)


def pack(r: Rollouts, pad_id: int = 0) -> Packed:
    B, T = r.response_ids_B_T.shape
    width = r.prompt_ids_B_P.shape[1] + T
    n_B = (r.response_mask_B_T.bool() * torch.arange(1, T + 1, device=r.response_mask_B_T.device)).max(-1).values
    seqs = [torch.cat([r.prompt_ids_B_P[b][r.prompt_mask_B_P[b].bool()], r.response_ids_B_T[b, :n_B[b]]])
            for b in range(B)]
    rows: list[list[int]] = []  # sequence indices per packed row
    room: list[int] = []
    for b in sorted(range(B), key=lambda b: -len(seqs[b])):  # first fit decreasing
        i = next((i for i, left in enumerate(room) if left >= len(seqs[b])), None)
        if i is None:
            rows.append([]), room.append(width)
            i = len(rows) - 1
        rows[i].append(b)
        room[i] -= len(seqs[b])
    N = max(width - left for left in room) if rows else 1
    device = r.response_ids_B_T.device
    ids = torch.full((len(rows), N), pad_id, dtype=torch.long, device=device)
    pos = torch.zeros((len(rows), N), dtype=torch.long, device=device)
    row_B_T = torch.zeros((B, T), dtype=torch.long, device=device)
    col_B_T = torch.zeros((B, T), dtype=torch.long, device=device)
    t_T = torch.arange(T, device=device)
    for i, members in enumerate(rows):
        start = 0
        for b in members:
            s = seqs[b]
            ids[i, start:start + len(s)] = s
            pos[i, start:start + len(s)] = torch.arange(len(s), device=device)
            first = start + len(s) - int(n_B[b]) - 1  # the last prompt token predicts token 0
            row_B_T[b] = i
            col_B_T[b] = (first + t_T).clamp(min=0, max=N - 1)
            start += len(s)
        pos[i, start:] = torch.arange(N - start, device=device)  # the row's unused tail: its own
    valid_B_T = t_T[None, :] < n_B[:, None]
    return Packed(ids, pos, row_B_T, col_B_T, valid_B_T)
