"""Sharded evaluation, for tests/test_deepspeed.py: a scripted sampler, so any difference between
one process and several comes from the sharding and the reduction alone.

    python -m torch.distributed.run --nproc_per_node 2 -m tests.engines.eval_probe OUT.json
    python -m tests.engines.eval_probe OUT.json                       # one process
OPD_EXP_TOY_DIR must point at a toy world.
"""

import json
import sys

import torch

from opd_exp.core.types import Rollouts, Sampling, left_pad
from opd_exp.data import load_benchmark, make_encoder
from opd_exp.engines.hf_models import load_tokenizer
from opd_exp.evaluation import evaluate
from opd_exp.runtime import distributed
from tests.conftest import compose


class ScriptedSampler:
    """Problem i gets (i mod (n + 1)) right answers among its n samples, of 3 + i % 5 tokens."""

    def __init__(self, tok, encode, problems):
        self.tok = tok
        self.index = {tuple(encode(p.prompt)): (i, p.answer) for i, p in enumerate(problems)}

    def generate(self, prompts, s: Sampling) -> Rollouts:
        rows = []
        for p in prompts:
            i, answer = self.index[tuple(p)]
            for j in range(s.n):
                text = ("x" * (i % 5)) + (f"\\boxed{{{answer}}}" if j < i % (s.n + 1) else "\\boxed{-1}")
                rows.append(self.tok(text, add_special_tokens=False).input_ids)
        T = max(map(len, rows))
        resp = torch.full((len(rows), T), self.tok.pad_token_id)
        mask = torch.zeros(len(rows), T)
        for b, r in enumerate(rows):
            resp[b, :len(r)], mask[b, :len(r)] = torch.tensor(r), 1.0
        ids, pmask = left_pad(prompts, self.tok.pad_token_id)
        return Rollouts(ids.repeat_interleave(s.n, 0), pmask.repeat_interleave(s.n, 0), resp, mask,
                        torch.arange(len(prompts)).repeat_interleave(s.n))


def main(out: str) -> None:
    cfg = compose([])
    dist = distributed.init()
    tok = load_tokenizer(cfg.pair.student, "pair.student")
    encode = make_encoder(tok, cfg.data.chat_template)
    benches = {b: load_benchmark(b, 13) for b in ("toy_L1", "toy_L3")}  # odd sizes: uneven shards
    sampler = ScriptedSampler(tok, encode, [p for ps in benches.values() for p in ps])
    scores = evaluate(sampler, tok, encode, benches, Sampling(n=4), dist)
    if dist.is_main:
        with open(out, "w") as f:
            json.dump(scores, f)
    dist.close()


if __name__ == "__main__":
    main(sys.argv[1])
