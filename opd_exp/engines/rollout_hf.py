"""HF rollout backend (`rollout=hf`, the default): `transformers` generate with a KV cache in
batches, behind the `RolloutBackend` Protocol (opd_exp/core/protocols.py)."""

from __future__ import annotations

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from opd_exp.core.protocols import RolloutBackend
from opd_exp.core.types import Rollouts, Sampling, concat_rollouts, left_pad, response_mask


class SampledTokenLogprobs(LogitsProcessor):
    """generate's only logits processor. It records log softmax(raw logits / T) of each sampled
    token — one step behind: the token drawn after step t is the last input id at step t + 1 —
    then applies HF's own temperature, top-k and top-p warpers (in HF's order). It holds one
    [B, V] step at a time, never [B, T, V] (HF's `output_logits` keeps T of them, then copies).
    Logits past `vocab_size` (padded embedding rows, never tokens) are never sampled."""

    def __init__(self, s: Sampling, vocab_size: int | None = None):
        self.temperature, self.vocab_size = s.temperature, vocab_size
        self.warpers = LogitsProcessorList(
            ([TemperatureLogitsWarper(s.temperature)] if s.temperature != 1.0 else [])
            + ([TopKLogitsWarper(s.top_k)] if s.top_k > 0 else [])
            + ([TopPLogitsWarper(s.top_p)] if s.top_p < 1.0 else []))
        self.prev_logp_B_V: torch.Tensor | None = None
        self.picked: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prev_logp_B_V is not None:
            self.picked.append(self.prev_logp_B_V.gather(-1, input_ids[:, -1:])[:, 0])
        if self.vocab_size is not None and scores.shape[-1] > self.vocab_size:
            scores = scores.clone()
            scores[:, self.vocab_size:] = -float("inf")
        self.prev_logp_B_V = torch.log_softmax(scores.float() / self.temperature, -1)
        return self.warpers(input_ids, scores)

    def logp_B_T(self, response_B_T: torch.Tensor) -> torch.Tensor:
        """The sampled tokens' log-probs, [B, T] (the last one gathered here)."""
        last = self.prev_logp_B_V.gather(-1, response_B_T[:, -1:].to(self.prev_logp_B_V.device))
        return torch.stack(self.picked + [last[:, 0]], 1)


class HFRollout:
    """`transformers` generate (KV cache), `batch_size` sequences at a time.

    Sampling is exactly `Sampling`'s: temperature, top-k (0 = off), top-p, and nothing else. The
    model's own `generation_config` (a shipped `repetition_penalty`, `top_k: 20`, `temperature`…)
    is set aside during generate: HF would otherwise fill every setting we leave unset from it
    and sample from a policy nobody computes log-probs of. The returned `logp_B_T` is the log-prob
    of each sampled token under softmax(logits / temperature), untruncated — the policy the
    learner differentiates.
    """

    shares_weights = True  # samples from the learner's own tensors (a background sampler copies them)

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
        recorder = SampledTokenLogprobs(s, len(self.tokenizer))
        own, self.model.generation_config = self.model.generation_config, GenerationConfig()
        try:  # HF's neutral defaults only; warping is the recorder's
            sequences = self.model.generate(
                input_ids=ids_B_P.to(dev), attention_mask=mask_B_P.to(dev), do_sample=True,
                temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=s.max_new_tokens,
                num_return_sequences=s.n, eos_token_id=self.stop_ids,
                pad_token_id=self.tokenizer.pad_token_id,
                logits_processor=LogitsProcessorList([recorder]))
        finally:
            self.model.generation_config = own
            self.model.train(was_training)
        P = ids_B_P.shape[1]
        response_B_T = sequences[:, P:].cpu()  # rollouts are returned on the CPU
        logp_B_T = recorder.logp_B_T(response_B_T).cpu()
        resp_mask = response_mask(response_B_T, set(self.stop_ids))
        return Rollouts(
            prompt_ids_B_P=ids_B_P.repeat_interleave(s.n, 0),
            prompt_mask_B_P=mask_B_P.repeat_interleave(s.n, 0),
            response_ids_B_T=response_B_T, response_mask_B_T=resp_mask,
            group_B=torch.arange(first_group, first_group + len(prompts)).repeat_interleave(s.n),
            logp_B_T=logp_B_T * resp_mask)


def make(cfg, model, tokenizer, stop_ids, work_dir, rank) -> RolloutBackend:
    return HFRollout(model, tokenizer, stop_ids, batch_size=cfg.rollout.batch_size)
