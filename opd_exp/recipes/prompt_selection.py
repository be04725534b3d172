"""Teacher-aligned prompt selection by score (SPEC §2 (c)): before training, each prompt of the
pool gets a score, and the top `prompts.keep_fraction` of the pool is kept (ties: pool order),
with an optional `prompts.unaligned_fraction` of the kept pool drawn back from the rest.

Scores:
- `pass_rate`: the share of `prompts.samples` teacher samples whose answer is right;
- `overlap`: on one student rollout per prompt, the mean over its response positions of
  |TopK(p) ∩ TopK(q)| / k, with p the student's and q the teacher's next-token distribution
  (SPEC §4's overlap ratio).

Scores are computed once, by rank 0, and cached in `<run dir>/prompt_scores.jsonl`, so that a
resumed run (whose student has moved) keeps the pool it started with.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from opd_exp.core.ranks import Dist
from opd_exp.core.types import Problem, Rollouts, Sampling
from opd_exp.data import PromptSource
from opd_exp.evaluation import rollout_correctness
from opd_exp.runtime.loggers import read_records

CHUNK = 256  # prompts per sampling call


def select_top(pool: list[Problem], scores: list[float], keep_fraction: float,
               unaligned_fraction: float = 0.0, seed: int = 0) -> tuple[list[Problem], dict]:
    """(kept prompts in pool order, metrics): the round(keep_fraction · N) best-scored prompts;
    with `unaligned_fraction` u, round(u · kept) of those places go to prompts drawn (seeded)
    from the rest."""
    n_keep = max(1, round(keep_fraction * len(pool)))
    ranked = sorted(range(len(pool)), key=lambda i: (-scores[i], i))
    n_back = min(round(unaligned_fraction * n_keep), len(pool) - n_keep)
    top, rest = ranked[:n_keep - n_back], ranked[n_keep - n_back:]
    back = random.Random(seed).sample(rest, n_back)
    kept = sorted(top + back)
    threshold = scores[ranked[n_keep - n_back - 1]] if n_keep > n_back else float("nan")
    mean = lambda idx: sum(scores[i] for i in idx) / max(1, len(idx))  # noqa: E731
    return [pool[i] for i in kept], {
        "data/scored": float(len(pool)), "data/selected": float(len(kept)),
        "data/unaligned": float(n_back), "data/score_threshold": float(threshold),
        "data/score_mean_all": mean(range(len(pool))), "data/score_mean_selected": mean(kept)}


def pass_rates(problems: list[Problem], sampler, encode, sampling: Sampling, tokenizer) -> list[float]:
    """The teacher's pass rate on each prompt (sampling.n samples each)."""
    out: list[float] = []
    for c in range(0, len(problems), CHUNK):
        chunk = problems[c:c + CHUNK]
        r = sampler.generate([encode(p.prompt) for p in chunk], sampling)
        correct = rollout_correctness(tokenizer, r, [p.answer for p in chunk])
        out += torch.zeros(len(chunk)).index_add_(0, r.group_B, correct).div(sampling.n).tolist()
    return out


def topk_overlap(student_topk: torch.Tensor, teacher_topk: torch.Tensor, mask_B_T: torch.Tensor) -> torch.Tensor:
    """Per row: mean over masked positions of |TopK(p) ∩ TopK(q)| / k, from the two [B, T, K] id
    tensors (ids within a position are distinct)."""
    k = student_topk.shape[-1]
    shared = (student_topk.unsqueeze(-1) == teacher_topk.unsqueeze(-2)).any(-1).sum(-1) / k
    return (shared * mask_B_T).sum(-1) / mask_B_T.sum(-1).clamp(min=1)


@torch.no_grad()
def policy_topk(view, r: Rollouts, k: int, chunk: int = 64) -> torch.Tensor:
    """[B, T, k] ids of the policy's top-k next tokens at each response position (a PolicyView;
    one chunk of positions through the LM head at a time, padded rows excluded)."""
    hidden = view.response_hidden(r)
    return torch.cat([view.lm_head(hidden[:, c:c + chunk])[..., :view.vocab_size].topk(k, -1)[1]
                      for c in range(0, hidden.shape[1], chunk)], 1)


def overlaps(problems: list[Problem], sampler, encode, sampling: Sampling,
             student_view, teacher_scorer, k: int, score_prompts=None,
             pad_id: int = 0) -> list[float]:
    """Top-K overlap of student and teacher on one student rollout per prompt: the student's
    top-K from its PolicyView, the teacher's from `score(rollouts, "topk", k)`; `score_prompts`
    renders a prompt for the teacher (pair.teacher_prompt=own)."""
    out: list[float] = []
    one = Sampling(1, sampling.temperature, sampling.top_p, sampling.top_k, sampling.max_new_tokens)
    for c in range(0, len(problems), CHUNK):
        chunk = problems[c:c + CHUNK]
        r: Rollouts = sampler.generate([encode(p.prompt) for p in chunk], one)
        s = policy_topk(student_view, r, k)
        seen = r if score_prompts is None else r.with_prompts(
            [score_prompts(p.prompt) for p in chunk], pad_id)
        t = teacher_scorer.score(seen, "topk", k).topk_idx_B_T_K
        out += topk_overlap(s.cpu(), t.cpu(), r.response_mask_B_T).tolist()
    return out


def select_prompts(source: PromptSource, prompts_cfg, path: Path, dist: Dist,
                   compute: Callable[[list[Problem]], list[float]]) -> PromptSource:
    """The pool (its first `max_prompts` in the seeded order, if set) cut to the top fraction by
    score; rank 0 scores and writes the cache, the other ranks read it."""
    pc, t0 = prompts_cfg, time.time()
    pool = source.pool
    if pc.max_prompts:
        pool = [pool[i] for i in source.order(0)[:pc.max_prompts]]
    if dist.is_main:
        cached_scores(path, pool, compute)
    dist.barrier()
    scores, _ = cached_scores(path, pool, None)
    kept, metrics = select_top(pool, scores, pc.keep_fraction, pc.unaligned_fraction, source.seed)
    metrics["data/score_seconds"] = time.time() - t0
    return replace(source, pool=kept, info={**source.info, **metrics})


def cached_scores(path: Path, problems: list[Problem],
                  compute: Callable[[list[Problem]], list[float]] | None) -> tuple[list[float], bool]:
    """(scores of `problems`, whether any was computed): those in the cache file are read, the
    others computed and appended."""
    cache = {r["prompt"]: r["score"] for r in read_records(path)}
    todo = [p for p in problems if p.prompt not in cache]
    if todo:
        with open(path, "a") as f:
            for p, s in zip(todo, compute(todo)):
                cache[p.prompt] = s
                f.write(json.dumps({"prompt": p.prompt, "score": s}) + "\n")
    return [cache[p.prompt] for p in problems], bool(todo)
