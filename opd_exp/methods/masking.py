"""Special-token masking (SPEC §1.6): tokens that are never trained on, beyond prompt/padding.

With `objective.special_mask=true`, the first occurrence in each response of a token whose text
(stripped) is one of `objective.mask_strings` (defaults `<`, `think`, `<|im_end|>`) is masked,
and the terminal stop token too when `objective.mask_stop_token`. Without it, nothing changes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from opd_exp.core.types import Rollouts


@dataclass
class SpecialTokenMask:
    groups: list[torch.Tensor]  # per configured string: the token ids whose text is that string
    stop_ids: torch.Tensor  # stop tokens to mask (empty: keep them)
    enabled: bool

    @classmethod
    def from_cfg(cls, ocfg, tokenizer, stop_ids: set[int]) -> "SpecialTokenMask":
        vocab = tokenizer.get_vocab()
        texts = {i: tokenizer.convert_tokens_to_string([t]).strip() for t, i in vocab.items()}
        groups = [torch.tensor(sorted(i for i, t in texts.items() if t == s), dtype=torch.long)
                  for s in ocfg.mask_strings]
        stops = torch.tensor(sorted(stop_ids) if ocfg.mask_stop_token else [], dtype=torch.long)
        return cls(groups, stops, ocfg.special_mask)

    def mask_B_T(self, ids_B_T: torch.Tensor) -> torch.Tensor:
        """1.0 where a token may be trained, 0.0 on the masked special tokens."""
        keep = torch.ones_like(ids_B_T, dtype=torch.float)
        for ids in self.groups:
            hit = torch.isin(ids_B_T, ids)
            first = hit & (hit.long().cumsum(-1) == 1)
            keep[first] = 0.0
        if self.stop_ids.numel():
            keep[torch.isin(ids_B_T, self.stop_ids)] = 0.0
        return keep

    def __call__(self, r: Rollouts) -> Rollouts:
        if not self.enabled:
            return r
        return replace(r, response_mask_B_T=r.response_mask_B_T * self.mask_B_T(r.response_ids_B_T))
