"""Teacher-aligned prompt selection by score (SPEC §2 (c)): before training, each prompt of the
pool gets a score, and the top `prompts.keep_fraction` of the pool is kept (ties broken by the
pool's seeded order), with an optional `prompts.unaligned_fraction` of the kept places given to
prompts drawn from the unselected rest.

Scores:
- `pass_rate`: the share of `prompts.samples` teacher samples whose answer is right;
- `overlap`: on one student rollout per prompt, the mean over its response positions of
  |TopK(p) ∩ TopK(q)| / k, with p the student's and q the teacher's next-token distribution
  (SPEC §4's overlap ratio).

Each rank scores its shard of the pool (prompts rank, rank + W, …), a chunk at a time, appending
to its cache `<work dir>/prompt_scores.jsonl` (stamped with the settings that made it), so a
resumed run — whose student has moved — keeps the pool it started with, and a run killed while
scoring goes on from the last chunk; the ranks then sum their shards into the whole list.
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
from opd_exp.engines.hf_policy import topk_and_entropy
from opd_exp.evaluation import rollout_correctness
from opd_exp.runtime.loggers import read_cache

CHUNK = 256  # prompts per sampling call (and per cache append)


def select_top(pool: list[Problem], scores: list[float], keep_fraction: float,
               unaligned_fraction: float = 0.0, seed: int = 0,
               tiebreak: list[int] | None = None) -> tuple[list[Problem], dict]:
    """(kept prompts in pool order, metrics): the round(keep_fraction · N) best-scored prompts
    (equal scores: lower `tiebreak[i]` first, default the pool index); with `unaligned_fraction`
    u, round(u · kept) of those places go to prompts drawn (seeded) from outside that top."""
    n_keep = max(1, round(keep_fraction * len(pool)))
    order = tiebreak or list(range(len(pool)))
    ranked = sorted(range(len(pool)), key=lambda i: (-scores[i], order[i]))
    n_back = min(round(unaligned_fraction * n_keep), len(pool) - n_keep)
    top, rest = ranked[:n_keep - n_back], ranked[n_keep:]
    back = random.Random(seed).sample(rest, n_back)
    kept = sorted(top + back)
    threshold = scores[top[-1]] if top else float("nan")
    mean = lambda idx: sum(scores[i] for i in idx) / max(1, len(idx))  # noqa: E731
    return [pool[i] for i in kept], {
        "data/scored": float(len(pool)), "data/selected": float(len(kept)),
        "data/unaligned": float(n_back), "data/score_threshold": float(threshold),
        "data/score_mean_all": mean(range(len(pool))), "data/score_mean_selected": mean(kept)}


def pass_rates(problems: list[Problem], sampler, encode, sampling: Sampling, tokenizer) -> list[float]:
    """The teacher's pass rate on each prompt (sampling.n samples each)."""
    r = sampler.generate([encode(p.prompt) for p in problems], sampling)
    correct = rollout_correctness(tokenizer, r, [p.answer for p in problems])
    return torch.zeros(len(problems)).index_add_(0, r.group_B, correct).div(sampling.n).tolist()


def topk_overlap(student_topk: torch.Tensor, teacher_topk: torch.Tensor, mask_B_T: torch.Tensor) -> torch.Tensor:
    """Per row: mean over masked positions of |TopK(p) ∩ TopK(q)| / k, from the two [B, T, K] id
    tensors (ids within a position are distinct)."""
    k = student_topk.shape[-1]
    shared = (student_topk.unsqueeze(-1) == teacher_topk.unsqueeze(-2)).any(-1).sum(-1) / k
    return (shared * mask_B_T).sum(-1) / mask_B_T.sum(-1).clamp(min=1)


def overlaps(problems: list[Problem], sampler, encode, sampling: Sampling, student_view,
             teacher_scorer, k: int, device, micro_batch_size: int, score_prompts=None,
             pad_id: int = 0) -> list[float]:
    """Top-K overlap of student and teacher on one student rollout per prompt: the student's
    top-K from its PolicyView, the teacher's from `score(rollouts, "topk", k)`; `score_prompts`
    renders a prompt for the teacher (pair.teacher_prompt=own)."""
    r: Rollouts = sampler.generate([encode(p.prompt) for p in problems], replace(sampling, n=1))
    r = r.to(device)
    s = topk_and_entropy(student_view, r, k, micro_batch_size)[1]
    seen = r if score_prompts is None else r.with_prompts(
        [score_prompts(p.prompt) for p in problems], pad_id).to(device)
    t = teacher_scorer.score(seen, "topk", k).topk_idx_B_T_K
    return topk_overlap(s.cpu(), t.cpu(), r.response_mask_B_T.cpu()).tolist()


def select_prompts(source: PromptSource, prompts_cfg, path: Path, made_under: dict, dist: Dist,
                   compute: Callable[[list[Problem], int], list[float]]) -> PromptSource:
    """The pool (its first `max_prompts` in the seeded order, if set) cut to the top fraction by
    score. `compute(prompts, chunk_no)` scores one chunk of this rank's shard."""
    pc, t0 = prompts_cfg, time.time()
    order = source.order(0)
    if pc.max_prompts:  # the first N in the seeded order: their index is their place in it
        pool, tiebreak = [source.pool[i] for i in order[:pc.max_prompts]], None
    else:
        pool, tiebreak = source.pool, [0] * len(order)
        for place, i in enumerate(order):
            tiebreak[i] = place
    mine = list(range(dist.rank, len(pool), dist.world_size))
    scores = torch.zeros(len(pool), dtype=torch.float64)
    scores[mine] = torch.tensor(cached_scores(path, made_under, [pool[i] for i in mine], compute),
                                dtype=torch.float64)
    scores = dist.sum_tensor(scores).tolist()
    kept, metrics = select_top(pool, scores, pc.keep_fraction, pc.unaligned_fraction, source.seed,
                               tiebreak)
    metrics["data/score_seconds"] = time.time() - t0
    return replace(source, pool=kept, info={**source.info, **metrics})


def cached_scores(path: Path, made_under: dict, problems: list[Problem],
                  compute: Callable[[list[Problem], int], list[float]]) -> list[float]:
    """Scores of `problems`: those in the cache read back, the others computed a chunk at a time
    (chunk c of the whole list, seeded by c) and appended as they come."""
    cache = {r["prompt"]: r["score"] for r in read_cache(path, made_under)}
    for c in range(0, len(problems), CHUNK):  # chunks of the whole list: a restart scores
        todo = [p for p in problems[c:c + CHUNK] if p.prompt not in cache]  # … as a straight run
        if todo:
            with open(path, "a") as f:
                for p, s in zip(todo, compute(todo, c // CHUNK)):
                    cache[p.prompt] = s
                    f.write(json.dumps({"prompt": p.prompt, "score": s}) + "\n")
    return [cache[p.prompt] for p in problems]
