"""opd_exp against TRL's `DistillationTrainer`, side by side on the toy pair.

    python scripts/bench_vs_trl.py [--steps 14] [--warmup 4] [--arms NAME …] [--repeats 1]
                                   [--pair toy|toy_qwen3]

The same setting in every arm: the shipped toy pair (toy:student ← toy:teacher; with `--pair
toy_qwen3` the same skills on the real Qwen3 vocabulary, 151,669 tokens in 151,936 rows:
toy:qwen3_student ← toy:qwen3_teacher), the toy training
prompts under the chat template, 64 sequences per step (TRL: 64 prompts × 1; opd_exp: 16 × 4),
at most 96 new tokens at temperature 1, full-vocabulary reverse KL (TRL β = 1; opd_exp
objective=full_vocab), lr 5e-4, float32, 2 threads, no evaluation, logging or checkpoints. Each
arm is a fresh process reporting its peak memory: the largest single process's `ru_maxrss`; for
an arm of several processes (DeepSpeed's two ranks) the largest PSS sum over its process tree if
that is more, polled every 0.1 s in a second run of the arm, since reading /proc/<pid>/smaps that
often slows the process read (a quarter of the step, measured on an ahead arm) — the timed run
is never polled. vLLM's engine runs in its caller's process. Step time = wall time of a step
(TRL: from its trainer's `on_step_begin` to `on_step_end` callbacks — generation, teacher,
loss, backward and optimizer step; opd_exp: `train/step_seconds`, the same span of `run_step`); the first `--warmup` steps are dropped and the median of
the rest is reported, with tokens/s = trained (completion) tokens of the step / its step time and
the median split of a step into rollout, teacher, train and weight-push time (TRL's teacher
forward runs inside its loss: timed with forward hooks and taken out of "train"; TRL has no
separate weight push with HF generate — "–"; with `rollout.max_staleness=1` opd_exp's push is
part of its rollout time). Between two steps opd_exp's loop only logs (milliseconds), so the
background sampling of the ahead arms gains almost nothing outside the measured span.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SEQUENCES, MAX_NEW, LR, THREADS = 64, 96, 5e-4, 2
# vLLM's engine in the arm's own process (its RSS is then the arm's; opd_exp's in-memory weight
# push needs it too); its KV cache sized by the arm (VLLM_CPU_KVCACHE_SPACE would override that)
ENV = {**{k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"},
       "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
KV = 16  # MiB of KV cache: 64 sequences x <= 160 tokens of the toy model need ~3 MiB
OPD = ["data.prompts_per_step=16", "rollout.n=4",
       f"rollout.max_new_tokens={MAX_NEW}", f"learner.lr={LR}",
       "eval.every=0", "logger.mode=disabled", "logger.plots=false", "trainer.save_every=0"]
VLLM = ["rollout=vllm", "rollout.max_model_len=512", f"rollout.kv_cache_mib={KV}"]
PACK = ["learner.packing=true", "teacher.packing=true"]  # the learner's and the HF teacher's forward
DS = ["learner=deepspeed", "launcher.nproc_per_node=2", "trainer.threads=1"]  # 2 ranks, 1 thread each
ARMS = {
    "trl, HF generate": ("trl", {}),
    "trl, vLLM colocate": ("trl", {"use_vllm": True, "vllm_mode": "colocate",
                                   "vllm_max_model_length": 512, "vllm_gpu_memory_utilization": 0.3}),
    # 64 sequences as 4 micro-batches of 16 (TRL generates per micro-batch): its [B, T, V] logits
    # a quarter as large, for a vocabulary where 64 sequences' do not fit
    "trl, HF generate, 16 × 4 accumulation": ("trl", {"per_device_train_batch_size": 16,
                                                      "gradient_accumulation_steps": 4}),
    "opd_exp, HF generate": ("opd", []),
    "opd_exp, HF generate + packing": ("opd", PACK),
    "opd_exp, HF generate + packing + ahead": ("opd", PACK + ["rollout.max_staleness=1", "rollout.score_ahead=true"]),
    "opd_exp, HF generate, DeepSpeed ZeRO-2 ×2": ("opd", DS),
    "opd_exp, vLLM + packing": ("opd", VLLM + PACK),
    # the vocabulary-wide losses' LM-head chunk at 8 positions (default 64): at V = 151,936 a
    # 64-sequence micro-batch's chunk of logits is 2.5 GB at 64 positions, 311 MB at 8
    "opd_exp, vLLM + packing, 8-position LM-head chunks": ("opd", VLLM + PACK + ["objective.chunk_size=8"]),
    "opd_exp, vLLM + packing, DeepSpeed ZeRO-2 ×2": ("opd", VLLM + DS + PACK),
    "opd_exp, vLLM + packing + ahead": ("opd", VLLM + PACK + ["rollout.max_staleness=1", "rollout.score_ahead=true"]),
    "opd_exp, vLLM + packing + ahead, teacher in the foreground": (
        "opd", VLLM + PACK + ["rollout.max_staleness=1", "rollout.score_ahead=false"]),
    # the engine compiled at start (~10 s more here) instead of eager
    "opd_exp, vLLM compiled + packing": ("opd", VLLM + PACK + ["rollout.enforce_eager=false"]),
    "opd_exp, vLLM compiled + packing + ahead": (
        "opd", VLLM + PACK + ["rollout.enforce_eager=false", "rollout.max_staleness=1", "rollout.score_ahead=true"]),
    # sampling and training side by side, one core each (HF: vLLM's CPU kernels keep their own)
    "opd_exp, HF generate + packing + ahead, 1 thread each": (
        "opd", PACK + ["rollout.max_staleness=1", "rollout.score_ahead=true", "trainer.threads=1"]),
    # the objectives side by side in the loop (the arms above: full-vocabulary reverse KL)
    "opd_exp, HF generate + packing, sampled-token power (α 0.5)": (
        "opd", PACK + ["objective=sampled_token", "reward=power", "reward.alpha=0.5"]),
    "opd_exp, HF generate + packing, top-16": ("opd", PACK + ["objective=topk", "objective.k=16"]),
}
PAIRS = {"toy": ("toy:student", "toy:teacher"), "toy_qwen3": ("toy:qwen3_student", "toy:qwen3_teacher")}


def toy_prompts(n: int) -> list[str]:
    from opd_exp.config import schema_cfg
    from opd_exp.data import make_prompts

    cfg = schema_cfg({"data": {"prompts_per_step": SEQUENCES}})
    pool = make_prompts(cfg.data, seed=0)
    return [pool.batch(i)[j].prompt for i in range(n // SEQUENCES + 1) for j in range(SEQUENCES)][:n]


class TreeRSS:
    """The largest sum of PSS (shared pages split between the processes that map them) over this
    process and all its descendants (torchrun ranks, engine processes), polled every 0.1 s in a
    thread; `ru_maxrss` sees one process at a time."""

    def __init__(self):
        import psutil

        self.peak, self.done = 0, threading.Event()
        me = psutil.Process()

        def poll():
            while not self.done.wait(0.1):
                total = 0
                for p in [me, *me.children(recursive=True)]:
                    try:
                        total += p.memory_full_info().pss
                    except psutil.Error:  # ended between listing and reading
                        pass
                self.peak = max(self.peak, total)
        self.thread = threading.Thread(target=poll, daemon=True)
        self.thread.start()

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return self.peak / 2**20


def run_trl(steps: int, extra: dict, pair: str) -> dict:
    """TRL's DistillationTrainer on the pair; per step: time, tokens, and its split."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from opd_exp.engines.hf_models import resolve_path

    torch.set_num_threads(THREADS)
    student, teacher = (resolve_path(p) for p in PAIRS[pair])
    tokenizer = AutoTokenizer.from_pretrained(student, padding_side="left")
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]}
                              for p in toy_prompts(SEQUENCES * steps)])
    out = tempfile.mkdtemp(prefix="trl_bench_")
    args = DistillationConfig(**{**dict(
        output_dir=out, per_device_train_batch_size=SEQUENCES, gradient_accumulation_steps=1,
        max_steps=steps, max_completion_length=MAX_NEW, temperature=1.0, beta=1.0,
        learning_rate=LR, lr_scheduler_type="constant", bf16=False, fp16=False,
        gradient_checkpointing=False, logging_steps=1, report_to="none", save_strategy="no",
        use_cpu=True, dataloader_num_workers=0, shuffle_dataset=False, seed=0), **extra})
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    trainer = DistillationTrainer(model=student, teacher_model=teacher_model, args=args,
                                  train_dataset=data, processing_class=tokenizer)
    clock = {"rollout": 0.0, "teacher": 0.0, "tokens": 0.0}
    generate = trainer._generate_and_score_completions

    def timed_generate(inputs):
        t = time.perf_counter()
        batch = generate(inputs)
        clock["rollout"] += time.perf_counter() - t
        clock["tokens"] += batch["completion_mask"].sum().item()
        return batch
    trainer._generate_and_score_completions = timed_generate
    started = {}
    teacher_model.register_forward_pre_hook(lambda *a: started.__setitem__("t", time.perf_counter()))
    teacher_model.register_forward_hook(
        lambda *a: clock.__setitem__("teacher", clock["teacher"] + time.perf_counter() - started["t"]))
    rows = []

    class Record(TrainerCallback):
        def on_step_begin(self, *a, **k):
            clock.update(rollout=0.0, teacher=0.0, tokens=0.0, t=time.perf_counter())

        def on_step_end(self, *a, **k):
            wall = time.perf_counter() - clock["t"]  # the step's generation happens inside it
            rows.append({"step": wall, "rollout": clock["rollout"], "teacher": clock["teacher"],
                         "train": wall - clock["rollout"] - clock["teacher"], "sync": None,
                         "tokens": clock["tokens"]})
    trainer.add_callback(Record())
    trainer.train()
    return {"rows": rows}


def opd_overrides(extra: list[str], pair: str) -> list[str]:
    """An opd_exp arm's command-line overrides: full-vocabulary reverse KL and 2 threads unless
    the arm says otherwise."""
    threads = [] if any(x.startswith("trainer.threads=") for x in extra) else [f"trainer.threads={THREADS}"]
    objective = [] if any(x.startswith("objective=") for x in extra) else ["objective=full_vocab"]
    return [f"pair={pair}", *OPD, *objective, *threads, *extra]


def run_opd(steps: int, extra: list[str], pair: str) -> dict:
    out = Path(tempfile.mkdtemp(prefix="opd_bench_"))
    cmd = [sys.executable, "-m", "opd_exp", "train", *opd_overrides(extra, pair),
           f"trainer.steps={steps}", f"hydra.run.dir={out}"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(p.stderr[-3000:])
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [{"step": r["train/step_seconds"], "rollout": r["rollout/seconds"],
             "teacher": r["teacher/seconds"], "train": r["train/seconds"],
             "sync": r["rollout/sync_seconds"], "tokens": r["rollout/tokens"]}
            for r in recs if r["step"] > 0]
    return {"rows": rows}


def one(name: str, steps: int, pair: str) -> dict:
    kind, extra = ARMS[name]
    return run_trl(steps, extra, pair) if kind == "trl" else run_opd(steps, extra, pair)


def summarise(name: str, rows: list[dict], warmup: int, rss_mib: float) -> dict:
    kept = rows[warmup:]
    med = {k: statistics.median(r[k] for r in kept) if kept[0][k] is not None else None
           for k in ("step", "rollout", "teacher", "train", "sync")}
    tps = statistics.median(r["tokens"] / r["step"] for r in kept)
    return {"arm": name, "steps": len(kept), **med, "tokens_per_s": tps, "peak_rss_mib": rss_mib}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of each arm, the arms taking turns (step times drift between runs)")
    ap.add_argument("--pair", default="toy", choices=list(PAIRS))
    ap.add_argument("--mem-limit-gib", type=float, default=0,
                    help="address-space limit of each arm's process (RLIMIT_AS), so an arm that "
                         "outgrows the machine fails alone with its error; 0 = none")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one arm, print its rows
    ap.add_argument("--pss", action="store_true", help=argparse.SUPPRESS)  # internal: poll PSS
    a = ap.parse_args()
    if a.steps <= a.warmup:
        ap.error("--steps must exceed --warmup")
    if a.one:
        if a.mem_limit_gib:
            limit = int(a.mem_limit_gib * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        tree = TreeRSS() if a.pss else None
        out = one(a.one, a.steps, a.pair)
        peak_kib = max(resource.getrusage(who).ru_maxrss
                       for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
        print(json.dumps({**out, "peak_rss_mib": max(peak_kib / 1024, tree.stop() if tree else 0.0)}))
        return
    runs: dict[str, list[dict]] = {name: [] for name in a.arms}
    failed = []
    for name in [n for _ in range(a.repeats) for n in a.arms]:  # a fresh process per run of an arm
        if name in failed:
            continue
        several = any(x.startswith("launcher.nproc_per_node=") for x in ARMS[name][1])
        outs = []
        for pss in ([False, True] if several else [False]):  # timed, then (several processes) PSS
            p = subprocess.run([sys.executable, __file__, "--one", name, "--steps", str(a.steps),
                                "--warmup", str(a.warmup), "--pair", a.pair, "--mem-limit-gib", str(a.mem_limit_gib),
                                *(["--pss"] if pss else [])],
                               capture_output=True, text=True, env=ENV)
            if p.returncode:
                break
            outs.append(json.loads(p.stdout.strip().splitlines()[-1]))
        if p.returncode:
            print(f"{name}: failed\n{p.stderr[-2500:]}", file=sys.stderr)
            failed.append(name)
            continue
        runs[name].append(summarise(name, outs[0]["rows"], a.warmup, max(o["peak_rss_mib"] for o in outs)))
        print(json.dumps(runs[name][-1]), flush=True)
    print(f"\npair={a.pair}, {SEQUENCES} sequences/step, ≤ {MAX_NEW} new tokens, full-vocabulary reverse KL "
          "(unless the arm says), fp32, "
          f"{THREADS} threads; medians of {a.steps - a.warmup} steps after {a.warmup} warm-up; "
          f"with several runs of an arm, the median run (by tokens/s) and the range over runs\n")
    print("| arm | runs | step s | tokens/s | tokens/s, all runs | rollout s | teacher s | train s "
          "| sync s | peak RSS MiB (max over runs) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, rs in runs.items():
        if not rs:
            continue
        r = sorted(rs, key=lambda x: x["tokens_per_s"])[(len(rs) - 1) // 2]  # the median run
        sync = "–" if r["sync"] is None else f"{r['sync']:.3f}"
        every = ", ".join(f"{x['tokens_per_s']:.0f}" for x in rs)
        print(f"| {name} | {len(rs)} | {r['step']:.3f} | {r['tokens_per_s']:.0f} | {every} | "
              f"{r['rollout']:.3f} | {r['teacher']:.3f} | {r['train']:.3f} | {sync} | "
              f"{max(x['peak_rss_mib'] for x in rs):.0f} |")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
