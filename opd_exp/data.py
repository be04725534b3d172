"""Prompts and benchmarks: the training prompt pool (toy, hub or file), visited in a seeded shuffled
order epoch by epoch, the evaluation benchmarks, and prompt text → token ids.

`PromptSource.batch(step)` is a pure function of (seed, step), so a resumed run sees the same
prompts.
"""

from __future__ import annotations

import json
import random
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from opd_exp import toyworld
from opd_exp.config import ConfigError
from opd_exp.core.types import Problem


def toy_pool(d, seed: int, levels=None) -> list[Problem]:
    from opd_exp.toyworld import build, task

    world_seed = toyworld.manifest()["seed"]  # its held-out benchmarks are never trained on
    problems = task.sample_problems(seed + 7_919, tuple(levels or d.levels), d.pool_size,
                                    exclude=build.heldout_prompts(world_seed))
    return [Problem(p.prompt, p.answer, f"L{p.level}") for p in problems]


def problems_from_rows(rows, prompt_field: str, answer_field: str,
                       tag_field: str | None = None) -> tuple[list[Problem], int]:
    """(problems, rows skipped): a row without the prompt field, with an empty prompt or with no
    answer is skipped and counted (hub data has such rows), never a KeyError mid-run. The tag
    (routing to a teacher) is the row's `tag_field` as text, "" where it has none."""
    out, skipped = [], 0
    for row in rows:
        prompt = row.get(prompt_field) if isinstance(row, dict) else None
        answer = row.get(answer_field) if isinstance(row, dict) else None
        if isinstance(answer, list):
            answer = answer[0] if answer else None
        if not isinstance(prompt, str) or not prompt.strip() or answer is None or not str(answer).strip():
            skipped += 1
            continue
        tag = row.get(tag_field) if tag_field else None
        out.append(Problem(prompt, str(answer), "" if tag is None else str(tag)))
    return out, skipped


def hub_rows(d):
    import datasets  # only real-model runs need it

    return datasets.load_dataset(d.name, d.subset, split=d.split)


def file_rows(path: str) -> list:
    """Rows of a .jsonl file (a line that is not a JSON object becomes a skipped row) or a
    .parquet file (pyarrow, installed with the hub extra)."""
    if path.endswith(".jsonl"):
        rows = []
        for line in Path(path).read_text().splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    rows.append(None)
        return rows
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ConfigError(f"data.path={path!r} is not allowed: reading parquet needs "
                          "pip install -e \".[hub]\" (pyarrow)") from e
    return pq.read_table(path).to_pylist()


@dataclass
class PromptSource:
    pool: list[Problem]
    per_step: int
    seed: int
    skipped: dict[str, int] = field(default_factory=dict)  # logged as data/<reason>
    info: dict[str, float] = field(default_factory=dict)  # logged as is (prompt selection)

    def stats(self) -> dict[str, float]:
        """data/prompts (the pool), data/<reason> (rows or prompts left out) and the selection's
        data/ metrics, for the log."""
        return {"data/prompts": len(self.pool), **{f"data/{k}": v for k, v in self.skipped.items()},
                **self.info}

    def keep(self, fits, reason: str) -> "PromptSource":
        """Only the problems `fits` accepts; the others counted under `reason`."""
        kept = [p for p in self.pool if fits(p)]
        skipped = {**self.skipped, reason: self.skipped.get(reason, 0) + len(self.pool) - len(kept)}
        if not kept:
            raise ConfigError(f"data: no usable prompt is left ({skipped})")
        return PromptSource(kept, self.per_step, self.seed, skipped, self.info)

    def dedup(self, mode: str) -> "PromptSource":
        """Drop repeated prompts (the first kept), counted as data/duplicates_exact and, with
        mode `near`, data/duplicates_near: the same text up to case, spacing, Unicode form and
        end punctuation (`Compute 3+4.` = `compute 3 + 4`; `near_key`)."""
        if mode == "none":
            return self
        out = self.keep(_first_seen(lambda p: p.prompt), "duplicates_exact")
        return out.keep(_first_seen(near_key), "duplicates_near") if mode == "near" else out

    def order(self, epoch: int) -> list[int]:
        order = list(range(len(self.pool)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def batch(self, step: int) -> list[Problem]:
        start = step * self.per_step
        spans = [divmod(i, len(self.pool)) for i in range(start, start + self.per_step)]
        orders = {epoch: self.order(epoch) for epoch in {e for e, _ in spans}}
        return [self.pool[orders[epoch][pos]] for epoch, pos in spans]


def near_key(p: Problem) -> str:
    """Case, Unicode form, runs of spaces, spaces next to a symbol and end punctuation ignored;
    spaces between two words or numbers kept (`3 4` is not `34`)."""
    text = re.sub(r"\s+", " ", unicodedata.normalize("NFKC", p.prompt).casefold()).strip()
    text = re.sub(r" ?([^\w ]) ?", r"\1", text)
    return text.rstrip(".?!。")


def _first_seen(key):
    seen: set = set()

    def fits(p: Problem) -> bool:
        k = key(p)
        new = k not in seen
        seen.add(k)
        return new
    return fits


def make_prompts(data_cfg, seed: int, content: str = "data", teacher_data: str | None = None,
                 teacher_path: str = "") -> PromptSource:
    """The training prompt pool in the order of `trainer.seed`; bad hub / file rows skipped.
    `content=teacher` (SPEC §2 (b)): the teacher's training distribution instead of `data.*` —
    the `teacher_data` file, or in the toy world the toy task at the levels the toy teacher
    `teacher_path` was trained on (its manifest entry)."""
    d = data_cfg
    if d.source == "toy":
        levels = None
        if content == "teacher":
            if not teacher_path.startswith("toy:"):
                raise ConfigError(f"prompts.content=teacher is not allowed with data.source=toy "
                                  f"and pair.teacher.path={teacher_path!r}: not a toy model")
            levels = toyworld.manifest()["models"][teacher_path.removeprefix("toy:")]["levels"]
        return PromptSource(toy_pool(d, seed, levels), d.prompts_per_step, seed)
    if content == "teacher":
        rows = file_rows(teacher_data)
    else:
        rows = hub_rows(d) if d.source == "hub" else file_rows(d.path)
    pool, skipped = problems_from_rows(rows, d.prompt_field, d.answer_field, d.tag_field)
    if not pool:
        raise ConfigError(f"data: no usable row in {d.name or d.path} ({skipped} skipped: no "
                          f"{d.prompt_field!r} / {d.answer_field!r}, or empty)")
    return PromptSource(pool, d.prompts_per_step, seed, {"skipped_rows": skipped})


def make_encoder(tokenizer, chat_template: bool, suffix: str = "", model_cfg=None,
                 template_tokenizer=None):
    """prompt text → token ids, through the tokenizer's chat template if asked, with the model's
    `chat_template_kwargs` and `system_prompt` (`model_cfg`: a pair.student / pair.teacher).
    `template_tokenizer`: render with another model's chat template (prompts.template=teacher),
    still encoded by `tokenizer`."""
    renderer = template_tokenizer or tokenizer
    kwargs = dict(model_cfg.chat_template_kwargs) if model_cfg is not None else {}
    system = model_cfg.system_prompt if model_cfg is not None else None

    def encode(text: str) -> list[int]:
        text = text + suffix
        if chat_template and renderer.chat_template:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": text}]
            text = renderer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=False, **kwargs)
        elif system:
            text = system + "\n\n" + text
        return tokenizer(text, add_special_tokens=False).input_ids
    return encode


# Hub benchmarks (SPEC §3): name -> (dataset id, split, prompt field, answer field).
HUB_BENCHMARKS = {
    "math500": ("HuggingFaceH4/MATH-500", "test", "problem", "answer"),
    "aime24": ("HuggingFaceH4/aime_2024", "train", "problem", "answer"),
    "aime25": ("math-ai/aime25", "test", "problem", "answer"),
    "amc23": ("math-ai/amc23", "test", "question", "answer"),
    "minerva_math": ("math-ai/minervamath", "test", "question", "answer"),
    "olympiadbench": ("math-ai/olympiadbench", "test", "question", "final_answer"),
}


def load_benchmark(name: str, max_problems: int = 0) -> list[Problem]:
    if name.startswith("toy_"):
        path = toyworld.benchmark_file(name)
        if not path.is_file():
            raise ConfigError(f"eval.benchmarks: unknown toy benchmark {name!r}: toy_L1 … toy_L6")
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        problems = [Problem(r["prompt"], r["answer"]) for r in rows]
    elif name in HUB_BENCHMARKS:
        import datasets  # only real-model runs need it

        hub_id, split, pf, af = HUB_BENCHMARKS[name]
        ds = datasets.load_dataset(hub_id, split=split)
        problems = [Problem(r[pf], str(r[af] if not isinstance(r[af], list) else r[af][0]))
                    for r in ds]
    else:
        raise ConfigError(f"eval.benchmarks: unknown benchmark {name!r}: toy_L1 … toy_L6 or one "
                          "of " + ", ".join(HUB_BENCHMARKS))
    return problems[:max_problems] if max_problems else problems


def student_encoder(cfg, tokenizer, teacher_tokenizer, suffix: str):
    """The student's prompt rendering (training, scoring, evaluation): its own chat template,
    kwargs and system prompt, or with prompts.template=teacher the teacher's (SPEC §2 (a)),
    encoded by the student's tokenizer."""
    if cfg.prompts.template == "teacher":
        return make_encoder(tokenizer, cfg.data.chat_template, suffix, cfg.pair.teacher,
                            teacher_tokenizer)
    return make_encoder(tokenizer, cfg.data.chat_template, suffix, cfg.pair.student)
