"""The data that flows through one step: problems, sampling settings, rollouts, teacher scores
and the step batch the objectives read.

Shapes are in the names: B sequences, P prompt positions (left-padded), T response positions
(right-padded). Position p of the concatenated `[prompt | response]` row predicts token p + 1, so
the logits that score response token t sit at concatenated position P + t − 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Optional

import torch


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    tag: str = ""  # what routes it to a teacher (pair.routes): the toy level "L3", data.tag_field


@dataclass(frozen=True)
class Sampling:
    """How a rollout backend samples (the `rollout.*` or `eval.*` settings)."""
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 96

    @classmethod
    def from_cfg(cls, c, n: int | None = None) -> "Sampling":
        return cls(n=c.n if n is None else n, temperature=c.temperature, top_p=c.top_p,
                   top_k=c.top_k, max_new_tokens=c.max_new_tokens)


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

    def with_prompts(self, prompts: list[list[int]], pad_id: int) -> "Rollouts":
        """The same responses after other prompt tokens (`prompts[g]` for the rows of group g):
        e.g. the prompt rendered with the teacher's own chat template."""
        ids, mask = left_pad(prompts, pad_id)
        g = self.group_B.cpu()
        return replace(self, prompt_ids_B_P=ids[g].to(self.prompt_ids_B_P.device),
                       prompt_mask_B_P=mask[g].to(self.prompt_mask_B_P.device))

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
    entropy_B_T: Optional[torch.Tensor] = None  # with "topk", where the backend sees the full softmax
    hidden_B_T_H: Optional[torch.Tensor] = None
    lm_head: Optional[torch.nn.Module] = None  # shared, not per row
    # a teacher with another tokenizer (engines/teacher_xtok.py, methods/xtok.py): the chunk of
    # each student token (−1: none); `logp_B_T` then holds log q(chunk) on each chunk's last
    # student token, to be credited to the chunk's tokens by `credit`
    chunk_B_T: Optional[torch.Tensor] = None
    credit: str = "last"
    # … with the top-K: `xtok_loss` (lsm | uld | uld_hybrid); for the ULD ablations
    # `topk_logq_B_T_K` holds the teacher's own top-K (not carried) and `topk_exact_B_T_K` the
    # student id spelled as each entry's teacher token (−1: none)
    xtok_loss: str = "lsm"
    topk_exact_B_T_K: Optional[torch.Tensor] = None
    metrics: dict = field(default_factory=dict)  # the scorer's own (xtok/*: docs/metrics.md)

    def select(self, idx: torch.Tensor | slice) -> "TeacherScores":
        return replace(self, **{f.name: getattr(self, f.name)[idx] for f in fields(self)
                                if torch.is_tensor(getattr(self, f.name))})


@dataclass
class StepBatch:
    """One step's rollouts with everything computed about them; objectives read it."""
    rollouts: Rollouts
    teacher: TeacherScores
    logp_old_B_T: Optional[torch.Tensor] = None  # learner's log-probs before the update
    advantages_B_T: Optional[torch.Tensor] = None
    correct_B: Optional[torch.Tensor] = None  # 1.0 where the response's answer is right
    # truncated importance weight min(p_old / π_rollout, cap) of each sampled token, set where
    # rollouts and learner meet (opd_exp/methods/importance.py); None = no correction
    is_weight_B_T: Optional[torch.Tensor] = None

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


def micro_slices(size: int, micro: int) -> list[slice]:
    return [slice(i, min(i + micro, size)) for i in range(0, size, micro)]


def response_mask(response_ids_B_T: torch.Tensor, stop_ids: set[int]) -> torch.Tensor:
    """1.0 on every token up to and including the first stop token of each row, 0.0 after."""
    is_stop = torch.zeros_like(response_ids_B_T, dtype=torch.bool)
    for s in stop_ids:
        is_stop |= response_ids_B_T == s
    stops_before = is_stop.cumsum(-1) - is_stop.long()  # stop tokens strictly before t
    return (stops_before == 0).float()


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


def concat_rollouts(parts: list[Rollouts], pad_id: int) -> Rollouts:
    """Stack rollouts of different widths (re-padding prompts left, responses right)."""
    P = max(r.prompt_ids_B_P.shape[1] for r in parts)
    T = max(r.response_ids_B_T.shape[1] for r in parts)

    def pad(x: torch.Tensor, width: int, value, left: bool) -> torch.Tensor:
        extra = width - x.shape[1]
        return torch.nn.functional.pad(x, (extra, 0) if left else (0, extra), value=value)

    return Rollouts(
        prompt_ids_B_P=torch.cat([pad(r.prompt_ids_B_P, P, pad_id, True) for r in parts]),
        prompt_mask_B_P=torch.cat([pad(r.prompt_mask_B_P, P, 0, True) for r in parts]),
        response_ids_B_T=torch.cat([pad(r.response_ids_B_T, T, pad_id, False) for r in parts]),
        response_mask_B_T=torch.cat([pad(r.response_mask_B_T, T, 0.0, False) for r in parts]),
        group_B=torch.cat([r.group_B for r in parts]),
        logp_B_T=(torch.cat([pad(r.logp_B_T, T, 0.0, False) for r in parts])
                  if all(r.logp_B_T is not None for r in parts) else None),
    )


def rollouts_from_samples(prompts: list[list[int]],
                          samples: list[list[tuple[list[int], list[float] | None]]],
                          pad: int, stop_ids: list[int]) -> Rollouts:
    """`samples[g]`: the (token ids, sampled-token log-probs or None) of prompt g's responses."""
    parts = []
    for g, (prompt, group) in enumerate(zip(prompts, samples)):
        ids_1_P, mask_1_P = left_pad([prompt], pad)
        lens = torch.tensor([len(ids) for ids, _ in group])
        T = max(1, int(lens.max()))
        resp = torch.full((len(group), T), pad, dtype=torch.long)
        logp = torch.zeros(len(group), T)
        for i, (ids, lps) in enumerate(group):
            resp[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            if lps is not None:
                logp[i, :len(ids)] = torch.tensor(lps)
        m = response_mask(resp, set(stop_ids)) * (torch.arange(T)[None] < lens[:, None])
        has_logp = all(lps is not None for _, lps in group)
        parts.append(Rollouts(ids_1_P.expand(len(group), -1), mask_1_P.expand(len(group), -1),
                              resp, m, torch.full((len(group),), g), logp * m if has_logp else None))
    return concat_rollouts(parts, pad)
