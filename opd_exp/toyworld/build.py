"""Build the toy world from a seed: tokenizer, held-out benchmarks, teacher and student models.

    python -m opd_exp toy build [--out DIR] [--seed 0]

Each model is a `transformers` Qwen3 causal LM pre-trained (supervised, response tokens only) on
the task of `task.py`, then saved with `save_pretrained` beside the tokenizer, so it loads with
`AutoModelForCausalLM.from_pretrained(DIR)` exactly like a hub model.
"""

from __future__ import annotations

import copy
import fcntl
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from opd_exp.toyworld import task
from opd_exp.toyworld.tokenizer import train_tokenizer

FORMAT_VERSION = 1
BENCHMARK_SIZE = 64  # problems per held-out benchmark (one benchmark per level)
BENCHMARK_SEED_OFFSET = 1_000_003
TOKENIZER_CORPUS_SIZE = 20_000
VOCAB_SIZE_LIMIT = 1024  # BPE stops earlier, when no pair is left to merge (~576 tokens)


@dataclass(frozen=True)
class ModelSpec:
    """Architecture and pre-training budget of one toy model."""
    name: str
    layers: int
    hidden: int
    intermediate: int
    levels: tuple[int, ...]  # task levels seen in pre-training
    steps: int
    lr: float = 3e-3
    batch_size: int = 64
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32  # vLLM's CPU attention needs head_dim >= 32


TEACHER = ModelSpec("teacher", layers=3, hidden=128, intermediate=384, levels=task.LEVELS,
                    steps=1500)
# The student is the teacher's own run stopped early: same tokenizer and architecture, past the
# sharp jump in learning (~step 650) but far from converged (TOYWORLD.md). It is weaker on every
# level, most of all on the long chains.
STUDENT_STEP = 900
BASE_PREFIX = "Question: {prompt}\nAnswer: "  # the Base student's plain-text documents
BASE_CHAT_SHARE = 0.2  # share of its documents that came wrapped in a chat template


@dataclass(frozen=True)
class Variant:
    """A model of the papers' conditions (SPEC §6), trained beside the pair with the teacher's
    architecture: its own run (`seed_offset`), response style (task.STYLES) and budget
    (`steps_share` of the teacher's steps, or the student's snapshot step)."""
    name: str
    style: str
    seed_offset: int
    steps_share: float = 1.0
    at_student_step: bool = False
    stands_for: str = ""
    levels: tuple[int, ...] | None = None  # task levels it is trained on (None: the teacher's)
    mix: tuple[str, float] | None = None  # (another style, the share of documents written in it)


VARIANTS = (
    Variant("teacher_foreign", "foreign", 31, stands_for=(
        "Rethinking OPD condition (i): as strong as the teacher, another pattern of thought")),
    # seed offset 17 = the teacher's own run: the student's initial weights and the student's
    # data, batch for batch, with the learning-rate schedule completed at the student's step
    Variant("teacher_same_data", "chat", 17, at_student_step=True, stands_for=(
        "Rethinking OPD condition (ii): the student's own data and pattern, nothing new")),
    Variant("base_student", "base", 29, steps_share=8 / 15, stands_for=(
        "PowerOPD's Qwen3-Base student: plain text, no think tags, stops at <|endoftext|>")),
    # two specialists for multi-teacher OPD (pair.teachers routed by level): the student's pattern
    Variant("teacher_short", "chat", 37, levels=(1, 2, 3), stands_for=(
        "multi-teacher OPD: a teacher of the short chains (levels 1-3 only)")),
    Variant("teacher_long", "chat", 41, levels=(4, 5, 6), stands_for=(
        "multi-teacher OPD: a teacher of the long chains (levels 4-6 only)")),
    # the papers' conditions where only the text around the equations differs (issue 23)
    Variant("teacher_readable", "readable", 43, stands_for=(
        "Rethinking OPD condition (i) as in the paper: another pattern of thought around "
        "equations the student reads (other connectives, a verification step)")),
    Variant("base_student_near", "base_near", 47, steps_share=8 / 15, stands_for=(
        "PowerOPD's Base student as in the paper: the chat thought as plain text, differing "
        "from the chat teacher at its start (no <think>) and its end")),
    Variant("teacher_seen_base", "chat", 53, mix=("base_near", 0.2), stands_for=(
        "PowerOPD's chat teacher as in the paper: 20 % of its documents were Base-style text")),
)


def benchmark_problems(seed: int) -> dict[str, list[task.Problem]]:
    """The six fixed held-out benchmarks `toy_L1` … `toy_L6`."""
    return {f"toy_L{lv}": task.sample_problems(seed + BENCHMARK_SEED_OFFSET + lv, (lv,),
                                               BENCHMARK_SIZE)
            for lv in task.LEVELS}


def heldout_prompts(seed: int) -> frozenset[str]:
    return frozenset(p.prompt for ps in benchmark_problems(seed).values() for p in ps)


def chat_prompt(tokenizer, prompt: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         add_generation_prompt=True, tokenize=False)


BASE_STYLES = ("base", "base_near")  # plain-text documents ending with <|endoftext|>


def renderer(style: str, tokenizer, seed: int, mix: tuple[str, float] | None = None):
    """`render(problem) -> (prompt text, response text with its end token)` for a style; a Base
    style draws plain-text or chat-wrapped prompts from its own seeded stream. With `mix =
    (other style, share)` that share of the documents is written in the other style instead."""
    rng = random.Random(seed + 3)

    def one(style: str):
        if style not in BASE_STYLES:
            return lambda p: (chat_prompt(tokenizer, p.prompt),
                              p.render(style) + tokenizer.eos_token)

        def render(p: task.Problem) -> tuple[str, str]:
            chat = rng.random() < BASE_CHAT_SHARE
            prompt = (chat_prompt(tokenizer, p.prompt) if chat
                      else BASE_PREFIX.format(prompt=p.prompt))
            return prompt, p.render(style) + tokenizer.pad_token
        return render

    own = one(style)
    if mix is None:
        return own
    other, share = one(mix[0]), mix[1]
    mix_rng = random.Random(seed + 5)
    return lambda p: (other if mix_rng.random() < share else own)(p)


def _batch(tokenizer, docs: list[tuple[str, str]], to_model=None) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response ids with labels on the response (and its end token) only;
    `to_model(ids)` maps the tokenizer's ids to the model's (a reduced vocabulary's: SmallVocab)."""
    to_model = to_model or (lambda ids: ids)
    rows = []
    for prompt_text, response_text in docs:
        prompt = to_model(tokenizer(prompt_text, add_special_tokens=False).input_ids)
        resp = to_model(tokenizer(response_text, add_special_tokens=False).input_ids)
        rows.append((prompt + resp, [-100] * len(prompt) + resp))
    width = max(len(ids) for ids, _ in rows)
    pad = to_model([tokenizer.pad_token_id])[0]
    ids = torch.tensor([r + [pad] * (width - len(r)) for r, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r, _ in rows])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_model(spec: ModelSpec, tokenizer: PreTrainedTokenizerFast, small=None) -> Qwen3ForCausalLM:
    """`small` (a SmallVocab): the model of a reduced vocabulary, its end and padding ids mapped."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if small is not None:
        eos, pad = small.to_small([eos, pad])
    config = Qwen3Config(
        vocab_size=len(tokenizer) if small is None else small.size, hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads, head_dim=spec.head_dim, max_position_embeddings=512,
        tie_word_embeddings=True, rope_theta=10000.0, eos_token_id=eos,
        pad_token_id=pad, bos_token_id=None)
    return Qwen3ForCausalLM(config)


def pretrain(spec: ModelSpec, tokenizer, seed: int, exclude: frozenset[str],
             progress: bool = True, log=print, on_step=None, style: str = "chat",
             mix: tuple[str, float] | None = None, render=None, small=None) -> Qwen3ForCausalLM:
    """Supervised pre-training on responses in `style` (and `mix`, see `renderer`), or as
    `render(problem) -> (prompt, response)` writes them; `on_step(step, model)` is called after
    every step if given. `small` (a SmallVocab): train on its reduced vocabulary, its `other`
    class's logit + `small.offset` (log N_other where `small.lifted`; lift.py)."""
    render = render or renderer(style, tokenizer, seed, mix)
    torch.manual_seed(seed)
    model = make_model(spec, tokenizer, small)
    rng = random.Random(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.98), weight_decay=0.1)
    warmup = max(1, int(0.03 * spec.steps))

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 10 %
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, spec.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    bar = tqdm(range(spec.steps), desc=f"pretrain {spec.name}", disable=not progress)
    for step in bar:
        level = rng.choice(spec.levels)  # one level per batch: little padding
        problems = []
        while len(problems) < spec.batch_size:
            p = task.make_problem(rng, level)
            if p.prompt not in exclude:
                problems.append(p)
        batch = _batch(tokenizer, [render(p) for p in problems], small and small.to_small)
        loss = model(**batch).loss if small is None else small.loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % 100 == 0:
            log(f"  {spec.name} step {step + 1}/{spec.steps} loss {loss.item():.4f}")
        if on_step is not None:
            on_step(step + 1, model)
    model.eval()
    return model


def save_model(folder: Path, model, tokenizer, style: str = "chat") -> None:
    """Model + tokenizer as a hub folder; a Base model's end token (config, generation_config and
    tokenizer) is <|endoftext|>, like Qwen3-Base's, an instruct model's <|im_end|>."""
    if style in BASE_STYLES:  # <|im_end|> stays a special token (as in Qwen3-Base), only not the eos
        specials = [t for t in tokenizer.all_special_tokens if t != tokenizer.pad_token]
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.eos_token = tokenizer.pad_token
        tokenizer.add_special_tokens({"additional_special_tokens": specials})
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def model_entry(spec: ModelSpec, name: str, model, steps: int, seconds: float, **extra) -> dict:
    return {**asdict(spec), "name": name, "steps": steps, "params": model.num_parameters(),
            "train_seconds": round(seconds, 1), **extra}


def train_variant(v: Variant, folder: Path, tokenizer, seed: int, teacher: ModelSpec,
                  student_step: int, exclude: frozenset[str], progress: bool = True,
                  log=print) -> dict:
    """Train variant `v` and save it into `folder`; its manifest entry."""
    steps = student_step if v.at_student_step else max(1, round(teacher.steps * v.steps_share))
    spec = replace(teacher, name=v.name, steps=steps, levels=v.levels or teacher.levels)
    t = time.time()
    model = pretrain(spec, tokenizer, seed + v.seed_offset, exclude, progress, log, style=v.style,
                     mix=v.mix)
    save_model(folder, model, tokenizer, v.style)
    return model_entry(spec, v.name, model, steps, time.time() - t, style=v.style,
                       stands_for=v.stands_for, **({"mix": list(v.mix)} if v.mix else {}))


def _publish(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def build_world(out: Path, seed: int = 0, teacher: ModelSpec = TEACHER,
                student_step: int = STUDENT_STEP, variants: tuple[Variant, ...] = VARIANTS,
                progress: bool = True, log=print) -> Path:
    """Build everything into `out` (atomically: a temp folder renamed at the end).

    The teacher is pre-trained for `teacher.steps`; the student is its snapshot at
    `student_step`; then each of `variants` is trained. (The real-vocabulary families are
    trained into a built world: qwen_models.add_families.)"""

    if not 0 < student_step < teacher.steps:
        raise ValueError(f"student_step must be in 1..{teacher.steps - 1}")
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.time()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    rng = random.Random(seed)
    corpus = []
    for i in range(TOKENIZER_CORPUS_SIZE):
        p = task.make_problem(rng, task.LEVELS[i % len(task.LEVELS)])
        corpus.append(f"<|im_start|>user\n{p.prompt}<|im_end|>\n"
                      f"<|im_start|>assistant\n{p.response}<|im_end|>\n")
    tokenizer = train_tokenizer(corpus, VOCAB_SIZE_LIMIT)
    log(f"tokenizer: {len(tokenizer)} tokens")

    benches = benchmark_problems(seed)
    bench_dir = tmp / "benchmarks"
    bench_dir.mkdir()
    for name, problems in benches.items():
        with open(bench_dir / f"{name}.jsonl", "w") as f:
            for p in problems:
                f.write(json.dumps({"prompt": p.prompt, "answer": p.answer, "level": p.level,
                                    "family": p.family}) + "\n")
    exclude = heldout_prompts(seed)

    manifest = {"format_version": FORMAT_VERSION, "seed": seed, "vocab_size": len(tokenizer),
                "benchmarks": {k: len(v) for k, v in benches.items()}, "models": {},
                "student_step": student_step}
    t = time.time()

    def snapshot(step: int, model) -> None:
        if step == student_step:
            save_model(tmp / "student", model, tokenizer)
            manifest["models"]["student"] = model_entry(teacher, "student", model, step,
                                                        time.time() - t)

    model = pretrain(teacher, tokenizer, seed + 17, exclude, progress, log, on_step=snapshot)
    save_model(tmp / "teacher", model, tokenizer)
    manifest["models"]["teacher"] = model_entry(teacher, "teacher", model, teacher.steps,
                                                time.time() - t)
    for v in variants:
        manifest["models"][v.name] = train_variant(v, tmp / v.name, tokenizer, seed, teacher,
                                                   student_step, exclude, progress, log)
    manifest["build_seconds"] = round(time.time() - t0, 1)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    _publish(tmp, out)
    log(f"toy world built in {manifest['build_seconds']} s -> {out}")
    return out


def teacher_spec(manifest: dict) -> tuple[ModelSpec, int]:
    """(the teacher's spec, the student's step) of a built world."""
    fields = {f for f in ModelSpec.__dataclass_fields__}
    spec = manifest["models"]["teacher"]
    teacher = ModelSpec(**{k: tuple(v) if k == "levels" else v for k, v in spec.items()
                           if k in fields})
    return teacher, manifest.get("student_step", manifest["models"]["student"]["steps"])


def _record(world: Path, entries: dict[str, dict], student_step: int) -> None:
    """Write models' entries into the world's manifest (atomically; another --only may be running)."""
    with open(world / "manifest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = json.loads((world / "manifest.json").read_text())
        manifest["models"].update(entries)
        manifest["student_step"] = student_step
        (world / "manifest.json.tmp").write_text(json.dumps(manifest, indent=2) + "\n")
        (world / "manifest.json.tmp").replace(world / "manifest.json")


def add_variants(world: Path, names: list[str], progress: bool = True, log=print) -> Path:
    """Train the named `VARIANTS` into an existing world (its tokenizer, seed, teacher spec and
    student step), each folder and the manifest replaced atomically; the pair is untouched."""
    world = Path(world)
    manifest = json.loads((world / "manifest.json").read_text())
    known = {v.name: v for v in VARIANTS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"--only: {unknown} not a toy variant; one of {sorted(known)}")
    seed = manifest["seed"]
    teacher, student_step = teacher_spec(manifest)
    tokenizer = AutoTokenizer.from_pretrained(world / "teacher")
    exclude = heldout_prompts(seed)
    for name in names:
        tmp = world / f"{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        entry = train_variant(known[name], tmp, tokenizer, seed, teacher, student_step, exclude,
                              progress, log)
        _publish(tmp, world / name)
        _record(world, {name: entry}, student_step)
        log(f"{name}: trained in {entry['train_seconds']} s -> {world / name}")
    return world
