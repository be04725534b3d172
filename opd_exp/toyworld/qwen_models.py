"""Toy models on the real Qwen vocabularies (issue 24): the toy world's skills at the real
vocabulary sizes, cheap to build and small to ship.

Each family is trained as the toy pair is (the teacher's spec, seed and batches; the student its
snapshot at the student's step), on the task written by the real tokenizer under the real chat
template (qwen_vocab.py), over a reduced vocabulary: the real ids the task uses (every special
token of the vocabulary included) plus one `other` class for every other embedding row, whose logit
carries + log N_other while training (lift.py; qwen3 trains with it plain: LIFTED_TRAINING);
that class's row is then fitted alone, at the lifted logit, so the
models put < 1e-7 outside the task's tokens on their training documents (`fit_other_row`; the
held-out mass is measured into the manifest). The world keeps the small model and its id map
(`real_ids.json`); the real-size model (151,936 or 248,320 rows) is lifted into the cache on first
use, beside the real tokenizer, so `toy:qwen3_student` loads like a hub Qwen3.

    qwen3   teacher + student   Qwen3's tokenizer, 151,936 rows (<think> one token)
    qwen25  teacher + student   Qwen2.5's, 151,936 rows (<think> written in three pieces)
    qwen36  teacher             Qwen3.6's, 248,320 rows; its template opens <think> itself

    python -m opd_exp toy build --only qwen3,qwen25,qwen36   (into a built world)
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from opd_exp.toyworld import qwen_vocab, task
from opd_exp.toyworld.lift import lift, other_offset

IDS_FILE = "real_ids.json"
CORPUS_SIZE = 20_000  # problems whose tokens make the reduced vocabulary
CALIBRATION_SIZE = 1024  # problems whose response positions fit the `other` row
OTHER_MASS_TARGET = 1e-7  # the largest mass outside the task's tokens it fits to
LIFT_VERSION = 1  # bump when lift.py or the lifted folder's layout changes: the cache is rewritten
FAMILIES = {"qwen3": True, "qwen25": True, "qwen36": False}  # family (= vocabulary) -> has a student
# Whether a family trains with `other` lifted (+ log N_other) from its first step. Not qwen3: there
# that logit starts ≈ 12 nats above the rest and the run never learned to copy the prompt's
# operands (two seeds; per-token NLL of its documents 0.45 at step 900 against 0.12 for the
# 577-token pair, whose documents are token for token the same). It trains with `other` as one
# plain class; `fit_other_row` then fits the row to the lifted logit, so the lifted model's
# softmax equals the small one's all the same. The shipped qwen25 and qwen36 trained lifted.
LIFTED_TRAINING = {"qwen3": False, "qwen25": True, "qwen36": True}
NAMES = tuple(f"{f}_{who}" for f, student in FAMILIES.items()
              for who in (("teacher", "student") if student else ("teacher",)))


@dataclass(frozen=True)
class SmallVocab:
    """The reduced vocabulary: small id i is real id `real_ids[i]`; the last, `other`, stands for
    the remaining `rows - size + 1` real rows (its entry is -1). `lifted=False`: `other` is one
    plain class (no + log N_other), as a family trains with LIFTED_TRAINING off."""
    real_ids: tuple[int, ...]
    rows: int
    lifted: bool = True

    @property
    def size(self) -> int:
        return len(self.real_ids)

    @property
    def other(self) -> int:
        return self.size - 1

    @property
    def offset(self) -> float:
        return other_offset(self.rows, self.size - 1) if self.lifted else 0.0

    @cached_property
    def _index(self) -> dict[int, int]:
        return {r: i for i, r in enumerate(self.real_ids[:-1])}

    def to_small(self, ids: list[int]) -> list[int]:
        return [self._index.get(i, self.other) for i in ids]

    def logits(self, model, input_ids, attention_mask=None) -> torch.Tensor:
        """The small model's logits with `offset` on `other`: with + log N_other (`lifted`), its
        real-size softmax."""
        z = model(input_ids=input_ids, attention_mask=attention_mask).logits
        bias = torch.zeros(self.size, dtype=z.dtype, device=z.device)
        bias[self.other] = self.offset
        return z + bias

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Next-token cross-entropy on the labelled positions (as a causal LM's `.loss`)."""
        z = self.logits(model, batch["input_ids"], batch["attention_mask"])
        return F.cross_entropy(z[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                               ignore_index=-100)

    def to_json(self, vocab: str) -> str:
        return json.dumps({"vocab": vocab, "rows": self.rows, "other": self.other,
                           "real_ids": list(self.real_ids)}) + "\n"

    @classmethod
    def load(cls, folder: Path) -> tuple[str, SmallVocab]:
        d = json.loads((Path(folder) / IDS_FILE).read_text())
        return d["vocab"], cls(tuple(d["real_ids"]), d["rows"])


def render(tokenizer, p: task.Problem) -> tuple[str, str]:
    """(prompt, response + end token) under the vocabulary's own chat template; where the
    generation prompt already opens `<think>` (Qwen3.6), the response continues inside it."""
    from opd_exp.toyworld.build import chat_prompt

    prompt = chat_prompt(tokenizer, p.prompt)
    response = p.response.removeprefix("<think>") if prompt.endswith("<think>\n") else p.response
    return prompt, response + tokenizer.eos_token


def _problems(seed: int, count: int, exclude: frozenset[str]) -> list[task.Problem]:
    """`count` problems drawn over the levels in turn, those whose prompt is in `exclude` (the
    held-out benchmarks') dropped."""
    rng = random.Random(seed)
    problems = [task.make_problem(rng, task.LEVELS[i % len(task.LEVELS)]) for i in range(count)]
    return [p for p in problems if p.prompt not in exclude]


def task_vocab(tokenizer, vocab: qwen_vocab.Vocab, seed: int, exclude: frozenset[str]) -> SmallVocab:
    """Every special token of the vocabulary, and every id the task's training documents use,
    tokenized as training and the loop do (prompt and response apart, and whole), in thinking
    and non-thinking prompts; then `other`."""
    problems = _problems(seed + 7, CORPUS_SIZE, exclude)
    docs = [render(tokenizer, p) for p in problems]
    texts = [t for d in docs for t in (*d, d[0] + d[1])]
    texts += [tokenizer.apply_chat_template([{"role": "user", "content": p.prompt}], tokenize=False,
                                            add_generation_prompt=True, enable_thinking=False)
              for p in problems[:100]]
    ids = set(range(vocab.first_special, vocab.size))
    for row in tokenizer(texts, add_special_tokens=False).input_ids:
        ids.update(row)
    return SmallVocab(tuple(sorted(ids)) + (-1,), vocab.rows)


def other_mass(model, small: SmallVocab, tokenizer, problems: list[task.Problem]) -> dict:
    """The mass the model puts outside the task's tokens (on `other`) at the response positions of
    the reference answers: mean and max."""
    from opd_exp.toyworld.build import _batch

    masses = []
    with torch.no_grad():
        for i in range(0, len(problems), 64):
            b = _batch(tokenizer, [render(tokenizer, p) for p in problems[i:i + 64]], small.to_small)
            p_other = small.logits(model, b["input_ids"], b["attention_mask"]).softmax(-1)[..., small.other]
            masses.append(p_other[:, :-1][b["labels"][:, 1:] != -100])
    m = torch.cat(masses).double()
    return {"other_mass_mean": float(m.mean()), "other_mass_max": float(m.max())}


def fit_other_row(model, small: SmallVocab, tokenizer, seed: int, exclude: frozenset[str],
                  steps: int = 5000, log=print) -> dict:
    """Fit the `other` row of the (tied) embedding alone, every other weight fixed, until the
    odds of `other` against the task's tokens are below OTHER_MASS_TARGET / e at every response
    position of CALIBRATION_SIZE training documents.

    Cross-entropy leaves the class slow to vanish: the first qwen3 models, trained lifted, put
    4e-5 on it on average and up to 0.07 at a position; trained plain (LIFTED_TRAINING), the
    rebuilt qwen3 student's largest log-odds at the lifted logit was +1.9 (p ≈ 0.87) before the
    fit. `small` must be the lifted vocabulary. The task tokens' logits do not change, so
    neither do their relative probabilities; the mass `other` had returns to them. Minimised:
    mean softplus(log-odds − log(target) + 2), convex in the row; Adam, deterministic. Returns
    the largest log-odds before and after, and the steps taken."""
    from opd_exp.toyworld.build import _batch

    problems = _problems(seed + 11, CALIBRATION_SIZE, exclude)
    h_N_H, lse_N = [], []  # final hidden states and the task tokens' logsumexp at each position
    with torch.no_grad():
        for i in range(0, len(problems), 64):
            b = _batch(tokenizer, [render(tokenizer, p) for p in problems[i:i + 64]], small.to_small)
            h = model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
            z = model.get_output_embeddings()(h)[..., :small.other]
            at = b["labels"][:, 1:] != -100
            h_N_H.append(h[:, :-1][at].double())
            lse_N.append(torch.logsumexp(z.double(), -1)[:, :-1][at])
    h_N_H, lse_N = torch.cat(h_N_H), torch.cat(lse_N)
    W = model.get_output_embeddings().weight
    row = W[small.other].detach().double().clone().requires_grad_()
    goal = math.log(OTHER_MASS_TARGET)
    opt = torch.optim.Adam([row], lr=0.02)
    log_odds = lambda: h_N_H @ row + small.offset - lse_N  # noqa: E731
    before, step = float(log_odds().detach().max()), 0
    for step in range(1, steps + 1):
        loss = F.softplus(log_odds() - goal + 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if float(log_odds().detach().max()) < goal - 1:
            break
    with torch.no_grad():
        W[small.other] = row.to(W.dtype)
    after = float(log_odds().detach().max())
    if after >= goal - 1:  # a barely trained model (a test world's) may have no such row
        log(f"fit_other_row: the largest log-odds of `other` is {after:.2f} after {step} steps, "
            f"not below {goal - 1:.2f}: the model puts up to {math.exp(after):.1e} outside the task")
    return {"other_log_odds_max_before": before, "other_log_odds_max": after, "other_fit_steps": step}


def _save_small(folder: Path, model, small: SmallVocab, vocab: str) -> None:
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.generation_config.pad_token_id = model.config.pad_token_id
    model.save_pretrained(folder)
    (folder / IDS_FILE).write_text(small.to_json(vocab))


def train_family(world: Path, family: str, progress: bool = True, log=print) -> dict[str, dict]:
    """Train `family`'s models into `world` (beside its toy pair); their manifest entries."""
    from opd_exp.toyworld.build import (_publish, benchmark_problems, heldout_prompts, model_entry,
                                        pretrain, teacher_spec)

    world = Path(world)
    manifest = json.loads((world / "manifest.json").read_text())
    seed, (teacher, student_step) = manifest["seed"], teacher_spec(manifest)
    exclude = heldout_prompts(seed)
    tokenizer = qwen_vocab.load(family)
    small = task_vocab(tokenizer, qwen_vocab.VOCABS[family], seed, exclude)
    log(f"{family}: {small.size - 1} task tokens of {len(tokenizer)}, {small.rows} rows")
    bench = [p for ps in benchmark_problems(seed).values() for p in ps]
    entries, t = {}, time.time()
    tmp = {who: world / f"{family}_{who}.tmp" for who in ("teacher", "student")}
    for folder in tmp.values():
        shutil.rmtree(folder, ignore_errors=True)

    def finish(name: str, spec, model, steps: int) -> None:
        """Fit the other row (on a copy at the student's snapshot: the run goes on), save, enter."""
        model = copy.deepcopy(model).eval() if name.endswith("_student") else model.eval()
        fit = fit_other_row(model, small, tokenizer, seed, exclude, log=log)
        _save_small(tmp[name.rsplit("_", 1)[1]], model, small, family)
        entries[name] = model_entry(spec, name, model, steps, time.time() - t, vocab=family,
                                    task_tokens=small.size - 1, rows=small.rows,
                                    lifted_training=LIFTED_TRAINING[family], **fit,
                                    **other_mass(model, small, tokenizer, bench))

    def snapshot(step: int, model) -> None:
        if FAMILIES[family] and step == student_step:
            finish(f"{family}_student", teacher, model, step)

    spec = replace(teacher, name=f"{family}_teacher")
    model = pretrain(spec, tokenizer, seed + 17, exclude, progress, log, on_step=snapshot,
                     render=lambda p: render(tokenizer, p),
                     small=replace(small, lifted=LIFTED_TRAINING[family]))
    finish(f"{family}_teacher", spec, model, teacher.steps)
    for name in entries:
        _publish(tmp[name.rsplit("_", 1)[1]], world / name)
    return entries


def add_families(world: Path, names: list[str], progress: bool = True, log=print) -> Path:
    """Train the named families (`FAMILIES`) into a built world, each folder and the manifest
    replaced atomically."""
    from opd_exp.toyworld.build import _record, teacher_spec

    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise ValueError(f"--only: {unknown} not a real-vocabulary family; one of {sorted(FAMILIES)}")
    world = Path(world)
    for name in names:
        entries = train_family(world, name, progress, log)
        _, student_step = teacher_spec(json.loads((world / "manifest.json").read_text()))
        _record(world, entries, student_step)
        for n, e in entries.items():
            log(f"{n}: trained in {e['train_seconds']} s -> {world / n}")
    return world


def _digest(folder: Path, vocab: str) -> str:
    """What the lifted folder is made of: the small model's files, the vocabulary's definition
    (ranks file, specials, chat template) and the lift's version."""
    h = hashlib.sha256(f"{LIFT_VERSION}:{qwen_vocab.VOCABS[vocab]!r}".encode())
    for f in ("model.safetensors", "config.json", "generation_config.json", IDS_FILE):
        h.update((folder / f).read_bytes())
    return h.hexdigest()[:12]


def lifted_dir(small_dir: Path) -> Path:
    """The real-size model of the small one in `small_dir`, with the real tokenizer: a hub-style
    folder in the cache (`qwen_vocab.cache_root()/models`), written on first use (atomically)."""
    small_dir = Path(small_dir)
    vocab, small = SmallVocab.load(small_dir)
    folder = qwen_vocab.cache_root() / "models" / f"{small_dir.name}-{_digest(small_dir, vocab)}"
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{folder.name}.tmp", dir=folder.parent))
    model = AutoModelForCausalLM.from_pretrained(small_dir, dtype=torch.float32)
    lift(model, list(small.real_ids), small.other, small.rows).save_pretrained(tmp)
    qwen_vocab.load(vocab).save_pretrained(tmp)
    try:
        tmp.rename(folder)
    except OSError:  # another process lifted it first
        if not (folder / "config.json").is_file():
            raise
    shutil.rmtree(tmp, ignore_errors=True)
    return folder
