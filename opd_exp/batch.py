"""The data that flows through one step: rollouts and teacher scores.

Shapes are in the names: B sequences, P prompt positions (left-padded), T response positions
(right-padded). Position p of the concatenated `[prompt | response]` row predicts token p + 1, so
the logits that score response token t sit at concatenated position P + t − 1.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch


@dataclass
class Rollouts:
    prompt_ids_B_P: torch.Tensor  # left-padded prompt token ids
    prompt_mask_B_P: torch.Tensor  # 1 on real prompt tokens
    response_ids_B_T: torch.Tensor  # sampled tokens, right-padded
    response_mask_B_T: torch.Tensor  # float, 1 on trained tokens (up to and incl. the stop token)
    group_B: torch.Tensor  # index of the prompt each row answers (n rows per prompt)
    logp_B_T: Optional[torch.Tensor] = None  # rollout engine's log-prob of each sampled token

    @property
    def size(self) -> int:
        return self.response_ids_B_T.shape[0]

    @property
    def input_ids_B_L(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids_B_P, self.response_ids_B_T], dim=1)

    @property
    def attention_mask_B_L(self) -> torch.Tensor:
        """Prompt padding masked; response padding needs no mask (causal: nothing reads it)."""
        return torch.cat([self.prompt_mask_B_P, torch.ones_like(self.response_ids_B_T)], dim=1)

    @property
    def position_ids_B_L(self) -> torch.Tensor:
        """Positions counted from each row's first real token (left padding does not count)."""
        return (self.attention_mask_B_L.cumsum(-1) - 1).clamp(min=0)

    def select(self, idx: torch.Tensor | slice) -> "Rollouts":
        return replace(self, **{f.name: getattr(self, f.name)[idx] for f in fields(self)
                                if getattr(self, f.name) is not None})

    def to(self, device: torch.device | str) -> "Rollouts":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if getattr(self, f.name) is not None})


@dataclass
class TeacherScores:
    """What the teacher says about the student's tokens; each objective asks only for its part:
    "sampled" → `logp_B_T`; "topk" → `topk_logq_B_T_K`, `topk_idx_B_T_K` (log-probs under the
    full softmax); "hidden" → `hidden_B_T_H` + `lm_head`, from which vocabulary-wide logits are
    made a chunk of positions at a time (never [B, T, V] at once)."""
    logp_B_T: Optional[torch.Tensor] = None
    topk_logq_B_T_K: Optional[torch.Tensor] = None
    topk_idx_B_T_K: Optional[torch.Tensor] = None
    hidden_B_T_H: Optional[torch.Tensor] = None
    lm_head: Optional[torch.nn.Module] = None  # shared, not per row

    def select(self, idx: torch.Tensor | slice) -> "TeacherScores":
        return replace(self, **{f.name: getattr(self, f.name)[idx] for f in fields(self)
                                if torch.is_tensor(getattr(self, f.name))})


def response_mask(response_ids_B_T: torch.Tensor, stop_ids: set[int]) -> torch.Tensor:
    """1.0 on every token up to and including the first stop token of each row, 0.0 after."""
    is_stop = torch.zeros_like(response_ids_B_T, dtype=torch.bool)
    for s in stop_ids:
        is_stop |= response_ids_B_T == s
    stops_before = is_stop.cumsum(-1) - is_stop.long()  # stop tokens strictly before t
    return (stops_before == 0).float()
