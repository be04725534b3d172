"""HF rollout backend (`rollout=hf`, the default): `transformers` generate with a KV cache in
batches, behind the `RolloutBackend` Protocol (opd_exp/core/protocols.py)."""

from __future__ import annotations

import torch

from opd_exp.core.protocols import RolloutBackend
from opd_exp.core.types import Rollouts, Sampling, concat_rollouts, left_pad, response_mask


class HFRollout:
    """`transformers` generate (KV cache), `batch_size` sequences at a time.

    Sampling uses the model's own logits / temperature with top-p / top-k as given; HF's implicit
    top_k=50 default is overridden (top_k=0 means no truncation). The returned `logp_B_T` is the
    log-prob of each sampled token under softmax(logits / temperature), untruncated — the policy
    the learner differentiates.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, stop_ids: set[int], batch_size: int = 256):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.stop_ids = sorted(stop_ids)

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.model = model  # same process, same tensors: nothing to copy

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: Sampling) -> Rollouts:
        per_call = max(1, self.batch_size // sampling.n)
        parts = [self._generate(prompts[i:i + per_call], sampling, first_group=i)
                 for i in range(0, len(prompts), per_call)]
        return concat_rollouts(parts, self.tokenizer.pad_token_id)

    def _generate(self, prompts: list[list[int]], s: Sampling, first_group: int) -> Rollouts:
        ids_B_P, mask_B_P = left_pad(prompts, self.tokenizer.pad_token_id)
        was_training = self.model.training
        self.model.eval()
        dev = self.model.device
        out = self.model.generate(
            input_ids=ids_B_P.to(dev), attention_mask=mask_B_P.to(dev), do_sample=True,
            temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_new_tokens=s.max_new_tokens,
            num_return_sequences=s.n, eos_token_id=self.stop_ids,
            pad_token_id=self.tokenizer.pad_token_id, output_logits=True,
            return_dict_in_generate=True)
        self.model.train(was_training)
        P = ids_B_P.shape[1]
        response_B_T = out.sequences[:, P:].cpu()  # rollouts are returned on the CPU
        logits_B_T_V = torch.stack(out.logits, dim=1).float().cpu() / s.temperature
        logp_B_T = torch.log_softmax(logits_B_T_V, -1).gather(-1, response_B_T[..., None])[..., 0]
        resp_mask = response_mask(response_B_T, set(self.stop_ids))
        return Rollouts(
            prompt_ids_B_P=ids_B_P.repeat_interleave(s.n, 0),
            prompt_mask_B_P=mask_B_P.repeat_interleave(s.n, 0),
            response_ids_B_T=response_B_T, response_mask_B_T=resp_mask,
            group_B=torch.arange(first_group, first_group + len(prompts)).repeat_interleave(s.n),
            logp_B_T=logp_B_T * resp_mask)


def make(cfg, model, tokenizer, stop_ids, work_dir, rank) -> RolloutBackend:
    return HFRollout(model, tokenizer, stop_ids, batch_size=cfg.rollout.batch_size)
