"""vLLM teacher backend (`teacher=vllm`): scores the student's rollouts with `prompt_logprobs`.

For big teachers: a vLLM engine scores prompt + response in one prefill and returns, at each
response position t, log q(y_t | y_<t) of the sampled token (`needs=sampled`) or the teacher's K
most likely tokens with their log-probs (`needs=topk`, top-K local support matching). Full
logits / hidden states (`needs=hidden`: full-vocabulary KL, student-side supports) stay with the
HF teacher. Log-probs are vLLM's raw ones: log softmax of the teacher's logits, temperature 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd_exp.core.protocols import RolloutBackend, Teacher
from opd_exp.core.types import Rollouts, TeacherScores
from opd_exp.engines.hf_models import model_shape, resolve_path
from opd_exp.engines.rollout_vllm import VLLMSampler, batching_kwargs, hub_source, start_engine


class VLLMTeacher:
    def __init__(self, path: str, dtype: str, max_model_len: int, gpu_memory_utilization: float,
                 max_logprobs: int, seed: int = 0, vocab_size: int | None = None,
                 rows: int | None = None, revision: str | None = None, trust_remote_code: bool = False,
                 max_num_batched_tokens: int = 0):
        """`vocab_size`: the tokenizer's real tokens of a model with `rows` output rows; padded rows
        past it never enter the top-K and are never sampled (vLLM's log-probs are normalised over
        every row: padding holds ~no mass in trained models). `revision`: of the hub model (its
        weights and tokenizer), as pair.teacher.revision pins the HF copies."""
        self.vocab_size = vocab_size
        kw = {"max_model_len": max_model_len} if max_model_len else {}
        self.padded = max(0, rows - vocab_size) if vocab_size and rows else 0
        self.rows = rows
        self.llm = start_engine(path, dtype, gpu_memory_utilization,
                                max_logprobs=max_logprobs + self.padded, seed=seed,
                                **hub_source(revision, trust_remote_code),
                                **batching_kwargs(max_num_batched_tokens), **kw)

    def sampler(self, tokenizer, stop_ids: set[int]) -> VLLMSampler:
        """The same engine as a rollout backend (teacher eval, off-policy teacher rollouts)."""
        return VLLMSampler(self.llm, tokenizer, stop_ids, vocab_size=self.vocab_size if self.padded else None,
                           rows=self.rows)

    @torch.no_grad()
    def score(self, rollouts: Rollouts, needs: str, k: int = 0) -> TeacherScores:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if needs == "none":
            return TeacherScores()
        check_needs(needs, "vllm")
        req = ScoreRequest.of(rollouts)

        def fetch(rows: list[int], logprobs: int) -> list:
            # the one token the request must generate is greedy, so scoring draws no random
            # number (a sampler running ahead in another thread shares torch's generator)
            params = SamplingParams(max_tokens=1, prompt_logprobs=logprobs, temperature=0.0,
                                    detokenize=False)
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=req.seqs[b]) for b in rows],
                                     params, use_tqdm=False)
            return [[{tok: (lp.rank, lp.logprob) for tok, lp in p.items()}
                     for p in out.prompt_logprobs[req.starts[b]:req.starts[b] + req.lengths[b]]]
                    for b, out in zip(rows, outs)]
        return req.scores(*req.fetch(fetch, needs, k, self.padded, self.vocab_size), needs, k,
                          self.vocab_size)


PADDED_MARGIN = 8  # padded ids a top-K request makes room for before asking K + all padded rows


def real_top(pos: dict[int, tuple[int | None, float]], asked: int,
             vocab_size: int | None) -> list[tuple[int, int, float]]:
    """(rank, token id, log q) of the real ids among a position's top-`asked`, best first (the
    sampled token is in `pos` with its rank even when outside the top: left out)."""
    return sorted((rank, tok, lp) for tok, (rank, lp) in pos.items()
                  if rank is not None and rank <= asked and (vocab_size is None or tok < vocab_size))


def check_needs(needs: str, backend: str) -> None:
    if needs not in ("sampled", "topk"):
        raise ValueError(f"teacher={backend} scores needs sampled|topk, not {needs!r}")


@dataclass
class ScoreRequest:
    """What a prompt-log-prob teacher (in-process engine or server) is asked: each row's prompt +
    response up to its last trained position (the mask may have holes: special-token masking;
    later positions stay 0 and are masked out), and how its answer becomes TeacherScores."""
    seqs: list[list[int]]  # prompt + response tokens, one per row
    starts: list[int]  # where each row's response starts in its sequence
    lengths: list[int]  # response positions scored per row
    mask_B_T: torch.Tensor  # on the CPU
    shape: tuple[int, int]
    device: torch.device

    @classmethod
    def of(cls, rollouts: Rollouts) -> "ScoreRequest":
        device, rollouts = rollouts.response_mask_B_T.device, rollouts.to("cpu")
        mask = rollouts.response_mask_B_T
        B, T = rollouts.response_ids_B_T.shape
        lengths = (mask.bool() * torch.arange(1, T + 1)).max(-1).values.tolist()
        seqs, starts = [], []
        for b in range(B):
            prompt = rollouts.prompt_ids_B_P[b][rollouts.prompt_mask_B_P[b].bool()].tolist()
            seqs.append(prompt + rollouts.response_ids_B_T[b, :lengths[b]].tolist())
            starts.append(len(prompt))
        return cls(seqs, starts, lengths, mask, (B, T), device)

    def fetch(self, fetch, needs: str, k: int, padded: int = 0, vocab_size: int | None = None
              ) -> tuple[list, list[int]]:
        """(positions, asked): `fetch(rows, n)` asks the teacher for those rows with n prompt
        log-probs per position. Padded ids (≥ vocab_size) are dropped from a top-K, so K real ids
        need up to K + padded entries — ~300 per position for Qwen3's 267 padded rows, where a
        trained teacher almost never ranks one. Every row is asked K + PADDED_MARGIN first; only
        rows with a position left short of K real ids are asked again with K + padded."""
        B = len(self.seqs)
        asked = k + min(padded, PADDED_MARGIN) if needs == "topk" else 0
        positions = fetch(list(range(B)), asked)
        if needs != "topk" or padded <= PADDED_MARGIN:
            return positions, [asked] * B
        short = [b for b, row in enumerate(positions)
                 if any(len(real_top(pos, asked, vocab_size)) < k for pos in row)]
        for b, row in zip(short, fetch(short, k + padded) if short else []):
            positions[b] = row
        again = set(short)
        return positions, [k + padded if b in again else asked for b in range(B)]

    def scores(self, positions: list[list[dict[int, tuple[int | None, float]]]], asked: list[int],
               needs: str, k: int, vocab_size: int | None = None) -> TeacherScores:
        """`positions[b][t]`: {token id: (rank, log q)} at response position t of row b — the
        sampled token always among them, the teacher's top-`asked[b]` by rank for needs=topk;
        padded ids (≥ vocab_size) are dropped from the top-K."""
        B, T = self.shape
        logp_B_T = torch.zeros(B, T)
        topv_B_T_K = torch.full((B, T, max(k, 1)), -float("inf"))
        topi_B_T_K = torch.zeros((B, T, max(k, 1)), dtype=torch.long)
        for b, row in enumerate(positions):
            for t, pos in enumerate(row):
                logp_B_T[b, t] = pos[self.seqs[b][self.starts[b] + t]][1]
                if needs == "topk":
                    top = real_top(pos, asked[b], vocab_size)[:k]
                    topi_B_T_K[b, t, :len(top)] = torch.tensor([tok for _, tok, _ in top])
                    topv_B_T_K[b, t, :len(top)] = torch.tensor([v for _, _, v in top])
        mask = self.mask_B_T
        if needs == "sampled":
            return TeacherScores(logp_B_T=(logp_B_T * mask).to(self.device))
        topv_B_T_K = topv_B_T_K.masked_fill(mask[..., None] == 0, 0.0)
        return TeacherScores(topk_logq_B_T_K=topv_B_T_K.to(self.device),
                             topk_idx_B_T_K=topi_B_T_K.to(self.device))


def make(cfg, tokenizer, stop_ids, device=None) -> tuple[Teacher, RolloutBackend]:
    """(scorer, sampler) over one vLLM engine of pair.teacher: no HF copy of the teacher. Scores
    come back on the device of the rollouts given to `score`."""
    t = cfg.teacher
    most = max(cfg.objective.k, cfg.prompts.k, cfg.diag.k, 20)  # top-K of any consumer
    teacher = VLLMTeacher(resolve_path(cfg.pair.teacher.path), cfg.pair.teacher.dtype,
                          t.max_model_len, t.gpu_memory_utilization, most,
                          seed=cfg.trainer.seed, vocab_size=len(tokenizer),
                          rows=model_shape(cfg.pair.teacher, "pair.teacher")[0],
                          revision=cfg.pair.teacher.revision,
                          trust_remote_code=cfg.pair.teacher.trust_remote_code,
                          max_num_batched_tokens=t.max_num_batched_tokens)
    return teacher, teacher.sampler(tokenizer, stop_ids)
