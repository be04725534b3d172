"""Training prompts: a fixed pool, visited in a seeded shuffled order (epoch by epoch).

`batch(step)` is a pure function of (seed, step), so a resumed run sees the same prompts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from opd_exp.evaluation import Problem


def toy_pool(cfg) -> list[Problem]:
    from opd_exp.toyworld import build, manifest, task

    seed = manifest()["seed"]  # held-out benchmarks of the world in use are never trained on
    problems = task.sample_problems(cfg.trainer.seed + 7_919, tuple(cfg.data.levels),
                                    cfg.data.pool_size, exclude=build.heldout_prompts(seed))
    return [Problem(p.prompt, p.answer) for p in problems]


def hub_pool(cfg) -> list[Problem]:
    import datasets  # only real-model runs need it

    d = cfg.data
    ds = datasets.load_dataset(d.name, d.subset, split=d.split)
    return [Problem(row[d.prompt_field], str(row[d.answer_field])) for row in ds]


@dataclass
class PromptSource:
    pool: list[Problem]
    per_step: int
    seed: int

    def order(self, epoch: int) -> list[int]:
        order = list(range(len(self.pool)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def batch(self, step: int) -> list[Problem]:
        start = step * self.per_step
        spans = [divmod(i, len(self.pool)) for i in range(start, start + self.per_step)]
        orders = {epoch: self.order(epoch) for epoch in {e for e, _ in spans}}
        return [self.pool[orders[epoch][pos]] for epoch, pos in spans]


def make_prompts(cfg) -> PromptSource:
    pool = toy_pool(cfg) if cfg.data.source == "toy" else hub_pool(cfg)
    return PromptSource(pool, cfg.data.prompts_per_step, cfg.trainer.seed)


def make_encoder(tokenizer, chat_template: bool, suffix: str = ""):
    """prompt text → token ids, through the tokenizer's chat template if asked."""
    def encode(text: str) -> list[int]:
        text = text + suffix
        if chat_template and tokenizer.chat_template:
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                 add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False).input_ids
    return encode
