"""Evaluation (SPEC §3): Avg@k and Pass@k with answers checked by math-verify.

Definitions (logged as eval/<benchmark>/avg@k etc.; eval/avg@k is the mean over benchmarks):
- avg@k  = mean over problems of (correct samples / k);
- pass@k = mean over problems of 1 − C(n−c, k)/C(n, k) (n samples, c correct; = "any correct"
  when n = k);
- avg@k_stderr = standard error of avg@k over problems (std / sqrt(#problems)); for the
  aggregate, sqrt(Σ_b se_b²) / #benchmarks.
"""

from __future__ import annotations

import math
import re
import threading
from functools import lru_cache

import torch

from opd_exp.core.protocols import RolloutBackend
from opd_exp.core.ranks import Dist
from opd_exp.core.types import Problem, Rollouts, Sampling


# ---------------------------------------------------------------------------------------------
# answer checking

def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} in `text` (balanced braces), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def _timeout() -> int | None:
    """math-verify's timeouts use signal.alarm, which only works in the main thread."""
    return 5 if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=65536)
def _parse(expr: str):
    from math_verify import parse

    return parse(f"\\boxed{{{expr}}}", parsing_timeout=_timeout())


_INTEGER = re.compile(r"\s*[+-]?[0-9]+\s*")


def _integer_key(s: str) -> str:
    """An integer's canonical digits (sign, no leading zeros, −0 = 0), of any length (int() refuses
    more than 4300 digits)."""
    s = s.strip()
    digits = s.lstrip("+-").lstrip("0") or "0"
    return ("-" if s.startswith("-") and digits != "0" else "") + digits


def is_correct(response: str, answer: str) -> bool:
    """The response's last boxed answer is mathematically equal to `answer` (math-verify)."""
    pred = last_boxed(response)
    if pred is None:
        return False
    if pred.strip() == answer.strip():
        return True  # identical strings: no need to ask the verifier
    if _INTEGER.fullmatch(pred) and _INTEGER.fullmatch(answer):
        return _integer_key(pred) == _integer_key(answer)  # math-verify's verdict, without its parser
    from math_verify import verify

    gold, guess = _parse(answer), _parse(pred)
    return bool(gold) and bool(guess) and verify(gold, guess, timeout_seconds=_timeout())


# ---------------------------------------------------------------------------------------------
# metrics

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimator 1 − C(n−c, k)/C(n, k) of P(at least one of k samples is correct)."""
    if k > n:
        raise ValueError(f"pass@k needs k <= n (k={k}, n={n})")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def score_counts(correct_counts: list[int], n: int, k: int) -> dict[str, float]:
    """avg@k, pass@k and the standard error of avg@k from per-problem correct counts."""
    accs = [c / n for c in correct_counts]
    m = len(accs)
    mean = sum(accs) / m
    var = sum((a - mean) ** 2 for a in accs) / (m - 1) if m > 1 else 0.0
    return {f"avg@{k}": mean, f"pass@{k}": sum(pass_at_k(n, c, k) for c in correct_counts) / m,
            f"avg@{k}_stderr": math.sqrt(var / m)}


def rollout_correctness(tokenizer, r: Rollouts, answers: list[str]) -> torch.Tensor:
    """1.0 for each response whose last boxed answer equals its prompt's answer (math-verify)."""
    ids = r.response_ids_B_T.masked_fill(r.response_mask_B_T == 0, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    return torch.tensor([float(is_correct(t, answers[g])) for t, g in zip(texts, r.group_B.tolist())])


def evaluate(rollout: RolloutBackend, tokenizer, encode, benchmarks: dict[str, list[Problem]],
             sampling: Sampling, dist: Dist = Dist()) -> dict[str, float]:
    """Sample `sampling.n` responses per problem and score them. Keys: <bench>/avg@k, …, avg@k.

    With several ranks each samples its share of the problems (i ≡ rank mod W, `dist.shard`)
    with its own engine; the per-problem correct counts are summed over ranks, so every rank
    returns the scores of the whole benchmark."""
    k = sampling.n
    out, ses = {}, []
    for name, problems in benchmarks.items():
        mine = dist.shard(list(range(len(problems))))
        counts_P = torch.zeros(len(problems) + 1, dtype=torch.float64)  # + total response tokens
        if mine:
            r = rollout.generate([encode(problems[i].prompt) for i in mine], sampling)
            correct = rollout_correctness(tokenizer, r, [problems[i].answer for i in mine])
            counts_P.index_add_(0, torch.tensor(mine)[r.group_B], correct.double())
            counts_P[-1] = r.response_mask_B_T.sum().item()
        counts_P = dist.sum_tensor(counts_P)
        scores = score_counts([int(c) for c in counts_P[:-1].tolist()], k, k)
        out.update({f"{name}/{key}": v for key, v in scores.items()})
        out[f"{name}/response_len"] = counts_P[-1].item() / (len(problems) * k)
        ses.append(scores[f"avg@{k}_stderr"])
    names = list(benchmarks)
    for key in (f"avg@{k}", f"pass@{k}", "response_len"):
        out[key] = sum(out[f"{b}/{key}"] for b in names) / len(names)
    out[f"avg@{k}_stderr"] = math.sqrt(sum(s * s for s in ses)) / len(names)
    return out
