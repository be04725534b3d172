"""vLLM teacher backend (`teacher=vllm`): scores the student's rollouts with `prompt_logprobs`.

For big teachers: a vLLM engine scores prompt + response in one prefill and returns, at each
response position t, log q(y_t | y_<t) of the sampled token (`needs=sampled`) or the teacher's K
most likely tokens with their log-probs (`needs=topk`, top-K local support matching). Full
logits / hidden states (`needs=hidden`: full-vocabulary KL, student-side supports) stay with the
HF teacher. Log-probs are vLLM's raw ones: log softmax of the teacher's logits, temperature 1.
"""

from __future__ import annotations

import torch

from opd_exp.core.protocols import RolloutBackend, Teacher
from opd_exp.core.types import Rollouts, TeacherScores
from opd_exp.engines.hf_models import model_shape, resolve_path
from opd_exp.engines.rollout_vllm import VLLMSampler, start_engine


class VLLMTeacher:
    def __init__(self, path: str, dtype: str, max_model_len: int, gpu_memory_utilization: float,
                 max_logprobs: int, seed: int = 0, vocab_size: int | None = None,
                 rows: int | None = None):
        """`vocab_size`: the tokenizer's real tokens of a model with `rows` output rows; padded rows
        past it never enter the top-K and are never sampled (vLLM's log-probs are normalised over
        every row: padding holds ~no mass in trained models)."""
        self.vocab_size = vocab_size
        kw = {"max_model_len": max_model_len} if max_model_len else {}
        self.padded = max(0, rows - vocab_size) if vocab_size and rows else 0
        self.llm = start_engine(path, dtype, gpu_memory_utilization,
                                max_logprobs=max_logprobs + self.padded, seed=seed, **kw)

    def sampler(self, tokenizer, stop_ids: set[int]) -> VLLMSampler:
        """The same engine as a rollout backend (teacher eval, off-policy teacher rollouts)."""
        return VLLMSampler(self.llm, tokenizer, stop_ids, vocab_size=self.vocab_size if self.padded else None)

    @torch.no_grad()
    def score(self, rollouts: Rollouts, needs: str, k: int = 0) -> TeacherScores:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if needs == "none":
            return TeacherScores()
        if needs not in ("sampled", "topk"):
            raise ValueError(f"teacher=vllm scores needs sampled|topk, not {needs!r}")
        B, T = rollouts.response_ids_B_T.shape
        # each row up to its last trained position (the mask may have holes: special-token
        # masking); later positions are left at 0 and are masked out
        device, rollouts = rollouts.response_mask_B_T.device, rollouts.to("cpu")
        mask = rollouts.response_mask_B_T
        pos_T = torch.arange(1, T + 1)
        lengths = (mask.bool() * pos_T).max(-1).values.tolist()
        seqs, starts = [], []
        for b in range(B):
            prompt = rollouts.prompt_ids_B_P[b][rollouts.prompt_mask_B_P[b].bool()].tolist()
            seqs.append(prompt + rollouts.response_ids_B_T[b, :lengths[b]].tolist())
            starts.append(len(prompt))
        # padded ids are dropped from the top-K: ask for enough entries to keep K real ones
        params = SamplingParams(max_tokens=1, prompt_logprobs=k + self.padded if needs == "topk" else 0,
                                detokenize=False)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs], params,
                                 use_tqdm=False)
        logp_B_T = torch.zeros(B, T)
        topv_B_T_K = torch.full((B, T, max(k, 1)), -float("inf"))
        topi_B_T_K = torch.zeros((B, T, max(k, 1)), dtype=torch.long)
        for b, out in enumerate(outs):
            for t in range(lengths[b]):
                pos = out.prompt_logprobs[starts[b] + t]  # {token id: Logprob} at this position
                logp_B_T[b, t] = pos[seqs[b][starts[b] + t]].logprob
                if needs == "topk":
                    top = sorted((lp.rank, tok, lp.logprob) for tok, lp in pos.items()
                                 if lp.rank is not None and lp.rank <= k + self.padded
                                 and (self.vocab_size is None or tok < self.vocab_size))[:k]
                    topi_B_T_K[b, t, :len(top)] = torch.tensor([tok for _, tok, _ in top])
                    topv_B_T_K[b, t, :len(top)] = torch.tensor([v for _, _, v in top])
        if needs == "sampled":
            return TeacherScores(logp_B_T=(logp_B_T * mask).to(device))
        topv_B_T_K = topv_B_T_K.masked_fill(mask[..., None] == 0, 0.0)
        return TeacherScores(topk_logq_B_T_K=topv_B_T_K.to(device), topk_idx_B_T_K=topi_B_T_K.to(device))


def make(cfg, tokenizer, stop_ids, device=None) -> tuple[Teacher, RolloutBackend]:
    """(scorer, sampler) over one vLLM engine of pair.teacher: no HF copy of the teacher. Scores
    come back on the device of the rollouts given to `score`."""
    t = cfg.teacher
    most = max(cfg.objective.k, cfg.prompts.k, cfg.diag.k, 20)  # top-K of any consumer
    teacher = VLLMTeacher(resolve_path(cfg.pair.teacher.path), cfg.pair.teacher.dtype,
                          t.max_model_len, t.gpu_memory_utilization, most,
                          seed=cfg.trainer.seed, vocab_size=len(tokenizer),
                          rows=model_shape(cfg.pair.teacher, "pair.teacher")[0])
    return teacher, teacher.sampler(tokenizer, stop_ids)
