"""Rollout backends: sample n responses per prompt from a policy.

A backend implements `RolloutBackend`; the loop only calls `generate` and `sync_weights`.
`hf` (here) runs `transformers` generate with a KV cache in batches. Other backends (vLLM) are
registered in BACKENDS by name and built by `make_rollout`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from opd_exp.batch import Rollouts, response_mask


@dataclass(frozen=True)
class Sampling:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 96

    @classmethod
    def from_cfg(cls, c, n: int | None = None) -> "Sampling":
        return cls(n=c.n if n is None else n, temperature=c.temperature, top_p=c.top_p,
                   top_k=c.top_k, max_new_tokens=c.max_new_tokens)


class RolloutBackend(Protocol):
    def generate(self, prompts: list[list[int]], sampling: Sampling) -> Rollouts:
        """`n` samples for each prompt (token ids, unpadded); rows grouped by prompt; CPU tensors."""

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the sampler use `model`'s current weights."""


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


def _make_hf(cfg, model, tokenizer, stop_ids, work_dir, rank) -> RolloutBackend:
    return HFRollout(model, tokenizer, stop_ids, batch_size=cfg.rollout.batch_size)


def _make_vllm(cfg, model, tokenizer, stop_ids, work_dir, rank) -> RolloutBackend:
    from opd_exp.rollout_vllm import make_vllm  # imports vLLM only when asked for

    return make_vllm(cfg, model, tokenizer, stop_ids, work_dir, rank)


def _make_vllm_server(cfg, model, tokenizer, stop_ids, work_dir, rank) -> RolloutBackend:
    from opd_exp.rollout_vllm_server import VLLMServerRollout

    return VLLMServerRollout(model, cfg.rollout.server_url, tokenizer, stop_ids, work_dir,
                             cfg.rollout.sync_every)


BACKENDS: dict[str, Callable[..., RolloutBackend]] = {"hf": _make_hf, "vllm": _make_vllm,
                                                      "vllm_server": _make_vllm_server}


def make_rollout(cfg, model, tokenizer, stop_ids: set[int], work_dir,
                 rank: int = 0) -> RolloutBackend:
    """`rank`: this process's rank in a launched job (engines seeded apart)."""
    return BACKENDS[cfg.rollout.backend](cfg, model, tokenizer, stop_ids, work_dir, rank)
