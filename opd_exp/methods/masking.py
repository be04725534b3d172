"""Special-token masking (SPEC §1.6): tokens that are never trained on, beyond prompt/padding.

With `objective.special_mask=true`, each string of `objective.mask_strings` (default: the
thinking tags and the end-of-turn token, `<think>`, `</think>`, `<|im_end|>`) is matched as TEXT
in each response: its first occurrence masks the tokens that spell it — one token where the
tokenizer writes the string as one token (Qwen3, the toy tokenizer), the pieces where it splits it
(`<`, `think`, `>`). The terminal stop token is masked too when `objective.mask_stop_token`.
Token ids the teacher's tokenizer does not share with the student's (`objective.mask_unshared`)
are masked wherever they occur. Without either, nothing changes.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass, replace
from itertools import accumulate

import torch

from opd_exp.core.types import Rollouts


def token_texts(tokenizer) -> list[str]:
    """The text of every token id (added tokens included), as the tokenizer decodes it alone."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return ["" if p is None else tokenizer.convert_tokens_to_string([p]) for p in pieces]


@dataclass
class SpecialTokenMask:
    strings: list[str]  # matched as text, first occurrence per response
    texts: list[str]  # text of each token id (empty when disabled)
    stop_ids: torch.Tensor  # stop tokens to mask (empty: keep them)
    enabled: bool  # objective.special_mask
    unshared_ids: torch.Tensor = torch.zeros(0, dtype=torch.long)  # masked at every occurrence

    @classmethod
    def from_cfg(cls, ocfg, tokenizer, stop_ids: set[int],
                 unshared_ids: list[int] = ()) -> "SpecialTokenMask":
        stops = torch.tensor(sorted(stop_ids) if ocfg.mask_stop_token else [], dtype=torch.long)
        texts = token_texts(tokenizer) if ocfg.special_mask else []
        return cls([s for s in ocfg.mask_strings if s], texts, stops, ocfg.special_mask,
                   torch.tensor(sorted(unshared_ids), dtype=torch.long))

    def spans(self, ids: list[int]) -> list[tuple[int, int]]:
        """Token index ranges [first, last) spelling the first occurrence of each string."""
        lengths = [len(self.texts[i]) if 0 <= i < len(self.texts) else 0 for i in ids]
        ends = list(accumulate(lengths))
        starts = [e - n for e, n in zip(ends, lengths)]
        text = "".join(self.texts[i] if 0 <= i < len(self.texts) else "" for i in ids)
        out = []
        for s in self.strings:
            pos = text.find(s)
            if pos >= 0:  # tokens overlapping [pos, pos + len(s)), empty tokens excluded
                out.append((bisect_right(ends, pos), bisect_left(starts, pos + len(s))))
        return out

    def mask_B_T(self, ids_B_T: torch.Tensor, valid_B_T: torch.Tensor) -> torch.Tensor:
        """1.0 where a token may be trained, 0.0 on the masked special tokens; only the valid
        part of each response (`valid_B_T` > 0, up to its last valid token) is searched."""
        keep = torch.ones_like(ids_B_T, dtype=torch.float)
        n_B = (valid_B_T > 0).long().cumsum(-1).argmax(-1) + 1  # one past the last valid token
        for b, row in enumerate(ids_B_T.tolist()):
            n = int(n_B[b]) if valid_B_T[b].any() else 0
            for first, last in self.spans(row[:n]):
                keep[b, first:last] = 0.0
        if self.stop_ids.numel():
            keep[torch.isin(ids_B_T, self.stop_ids)] = 0.0
        return keep

    def __call__(self, r: Rollouts) -> tuple[Rollouts, dict[str, float]]:
        """(rollouts with the special tokens masked, {"masked_tokens": how many were trained
        before}); unchanged and no metric when disabled."""
        if not self.enabled and not self.unshared_ids.numel():
            return r, {}
        old = r.response_mask_B_T
        new = old * (~torch.isin(r.response_ids_B_T, self.unshared_ids)).float()
        if self.enabled:
            new = new * self.mask_B_T(r.response_ids_B_T, old)
        return replace(r, response_mask_B_T=new), {"masked_tokens": (old - new).sum().item()}
