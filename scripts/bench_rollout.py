"""Rollout throughput: HF generate vs vLLM on the toy student at equal settings.

    python scripts/bench_rollout.py [--backends hf vllm] [--prompts 32] [--n 8] [--new 256] [--reps 3]

Each backend runs in its own subprocess (vLLM binds threads). Sampling: T = 1.0, no top-p/top-k,
up to `--new` new tokens (the toy model usually stops earlier at its end-of-turn token), prompts
from toy_L6. tokens/s counts generated tokens (up to and including the stop token); the first
call is a warm-up and is not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_one(backend: str, n_prompts: int, n: int, new: int, reps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd_exp import toyworld
    from opd_exp.core.types import Sampling
    from opd_exp.data import load_benchmark, make_encoder
    from opd_exp.engines.rollout_hf import HFRollout

    torch.manual_seed(0)
    path = toyworld.model_dir("student")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    stop = {tok.eos_token_id}
    t = time.perf_counter()
    if backend == "hf":
        engine = HFRollout(model, tok, stop, batch_size=n_prompts * n)
    else:
        from opd_exp.engines.rollout_vllm import VLLMRollout

        engine = VLLMRollout(model, tok, stop, Path(tempfile.mkdtemp(prefix="opd_bench_")),
                             "float32", 512, 0.3, 1, seed=0)
    startup = time.perf_counter() - t
    enc = make_encoder(tok, True)
    prompts = [enc(p.prompt) for p in load_benchmark("toy_L6", n_prompts)]
    s = Sampling(n=n, max_new_tokens=new)
    engine.generate(prompts, s)  # warm-up
    tokens, seconds = 0, 0.0
    for _ in range(reps):
        t = time.perf_counter()
        r = engine.generate(prompts, s)
        seconds += time.perf_counter() - t
        tokens += int(r.response_mask_B_T.sum())
    return {"backend": backend, "startup_s": startup, "tokens": tokens / reps,
            "seconds": seconds / reps, "tokens_per_s": tokens / seconds}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", nargs="+", default=["hf", "vllm"])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_one(a.one, a.prompts, a.n, a.new, a.reps)))
        return
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    rows = []
    for b in a.backends:
        p = subprocess.run([sys.executable, __file__, "--one", b, "--prompts", str(a.prompts),
                            "--n", str(a.n), "--new", str(a.new), "--reps", str(a.reps)],
                           capture_output=True, text=True, env=env)
        if p.returncode:
            print(p.stderr[-2000:], file=sys.stderr)
            continue
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    print(f"\n{a.prompts} prompts × n = {a.n}, ≤ {a.new} new tokens, T = 1.0, toy student, 2 CPU threads\n")
    print("| backend | start-up s | tokens / call | s / call | tokens/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['startup_s']:.1f} | {r['tokens']:.0f} | {r['seconds']:.2f} "
              f"| {r['tokens_per_s']:.0f} |")


if __name__ == "__main__":
    main()
