"""Build the toy world from a seed: tokenizer, held-out benchmarks, teacher and student models.

    python -m opd_exp toy build [--out DIR] [--seed 0]

Each model is a `transformers` Qwen3 causal LM pre-trained (supervised, response tokens only) on
the task of `task.py`, then saved with `save_pretrained` beside the tokenizer, so it loads with
`AutoModelForCausalLM.from_pretrained(DIR)` exactly like a hub model.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

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


def _batch(tokenizer, problems: list[task.Problem]) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response ids with labels on the response (and end-of-turn) only."""
    rows = []
    for p in problems:
        prompt = tokenizer(chat_prompt(tokenizer, p.prompt), add_special_tokens=False).input_ids
        resp = tokenizer(p.response + tokenizer.eos_token, add_special_tokens=False).input_ids
        rows.append((prompt + resp, [-100] * len(prompt) + resp))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r, _ in rows])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_model(spec: ModelSpec, tokenizer: PreTrainedTokenizerFast) -> Qwen3ForCausalLM:
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads, head_dim=spec.head_dim, max_position_embeddings=512,
        tie_word_embeddings=True, rope_theta=10000.0, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    return Qwen3ForCausalLM(config)


def pretrain(spec: ModelSpec, tokenizer, seed: int, exclude: frozenset[str],
             progress: bool = True, log=print, on_step=None) -> Qwen3ForCausalLM:
    """Supervised pre-training; `on_step(step, model)` is called after every step if given."""
    torch.manual_seed(seed)
    model = make_model(spec, tokenizer)
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
        loss = model(**_batch(tokenizer, problems)).loss
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


def build_world(out: Path, seed: int = 0, teacher: ModelSpec = TEACHER,
                student_step: int = STUDENT_STEP, progress: bool = True, log=print) -> Path:
    """Build everything into `out` (atomically: a temp folder renamed at the end).

    The teacher is pre-trained for `teacher.steps`; the student is its snapshot at
    `student_step`."""
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
                "benchmarks": {k: len(v) for k, v in benches.items()}, "models": {}}

    def save(name: str, model, step: int, seconds: float) -> None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp / name)
        tokenizer.save_pretrained(tmp / name)
        manifest["models"][name] = {**asdict(teacher), "name": name, "steps": step,
                                    "params": model.num_parameters(),
                                    "train_seconds": round(seconds, 1)}

    t = time.time()

    def snapshot(step: int, model) -> None:
        if step == student_step:
            save("student", model, step, time.time() - t)

    model = pretrain(teacher, tokenizer, seed + 17, exclude, progress, log, on_step=snapshot)
    save("teacher", model, teacher.steps, time.time() - t)
    manifest["build_seconds"] = round(time.time() - t0, 1)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log(f"toy world built in {manifest['build_seconds']} s -> {out}")
    return out
