"""Wall time and peak memory of one forward+backward of each vocabulary-wide objective.

    python scripts/bench_objectives.py [--vocab 151936] [--hidden 1024] [--lengths 512 2048]

Inputs: student/teacher final hidden states [1, T, H] and LM-head weights [V, H] (float32), all
positions valid. Each (objective, T) runs in a fresh subprocess, with glibc's mmap threshold
fixed at 128 KiB so that every freed buffer above it leaves the RSS at once. Two numbers:
- "peak extra": the process's peak RSS (VmHWM, reset just before the measured forward) minus its
  RSS once inputs and weights exist: everything the loss allocates, the gradients it returns (the
  LM head's [V, H] one: 594 MiB here) included;
- "transient": the peak minus the RSS after backward with the gradients kept (loss and graph
  freed): the memory the objective needs beyond the gradients every objective must return.
Implementations:
- naive: full [1, T, V] logits of both models, log-softmax, reverse KL (what a model forward that
  returns logits costs);
- chunked: opd_exp FullVocabOPD (LM heads applied `chunk` positions at a time, recomputed in
  backward);
- trl_chunked: TRL's `_chunked_divergence_loss` (β = 1, reverse KL) on the same inputs;
- topk: opd_exp TopKOPD (K = 32, teacher support, renormalised) given the teacher's top-K
  (log-probs, ids), which the teacher backend computes under no_grad beforehand;
- sampled_naive / sampled_chunked: the sampled-token estimator's part that touches the
  vocabulary, −(1/T) Σ_t A_t log p(y_t) with fixed advantages A_t: log p(y_t) from the whole
  [1, T, V] logits (what `model(...).logits` gives), or from opd_exp's `head_token_logprobs`
  (the LM head a chunk of positions at a time, recomputed in backward; `--chunk 0`: its default,
  128 MiB of float32 logits a chunk — 220 positions here).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def run_one(impl: str, T: int, V: int, H: int, chunk: int, K: int) -> dict:
    import torch

    from opd_exp.config import schema_cfg

    torch.manual_seed(0)
    torch.set_num_threads(2)
    h_s = (torch.randn(1, T, H) * 0.5).requires_grad_()
    h_t = torch.randn(1, T, H) * 0.5
    head_s = torch.nn.Linear(H, V, bias=False)
    head_t = torch.nn.Linear(H, V, bias=False)
    for p in head_t.parameters():
        p.requires_grad_(False)
    mask = torch.ones(1, T)
    extra_inputs, chunk_arg = None, chunk or None
    chunk = chunk or schema_cfg({}).objective.chunk_size  # the other objectives' default
    cfg = schema_cfg({"objective": {"divergence": "reverse_kl", "beta": 0.5, "chunk_size": chunk,
                                          "k": K, "support": "teacher", "renormalize": True,
                                          "gradient": "analytic", "weight": "student"},
                            "rollout": {"temperature": 1.0}})
    from opd_exp.methods.full_vocab import FullVocabOPD  # imports outside the measurement
    from opd_exp.methods.head_logprobs import head_token_logprobs
    from opd_exp.methods.topk import TopKOPD

    if impl == "trl_chunked":
        from trl.trainer.distillation_trainer import _chunked_divergence_loss
    if impl.startswith("sampled"):  # the sampled tokens and their advantages
        extra_inputs = (torch.randint(0, V, (1, T)), torch.randn(1, T))
    if impl == "topk":
        with torch.no_grad():  # the teacher backend's job, before the loss
            vals, idx = [], []
            for c in range(0, T, chunk):
                v, i = torch.log_softmax(head_t(h_t[:, c:c + chunk]), -1).topk(K, -1)
                vals.append(v)
                idx.append(i)
            extra_inputs = (torch.cat(vals, 1), torch.cat(idx, 1))

    def loss_fn(h_s, h_t, mask, extra_inputs, T):
        if impl == "naive":
            logp = torch.log_softmax(head_s(h_s), -1)
            with torch.no_grad():
                logq = torch.log_softmax(head_t(h_t), -1)
            loss = (logp.exp() * (logp - logq)).sum() / T
        elif impl == "chunked":
            loss = FullVocabOPD(cfg.objective, cfg.reward, 1.0).summed(head_s, head_t, h_s, h_t, mask) / T
        elif impl == "trl_chunked":
            loss = _chunked_divergence_loss(h_s, h_t, head_s.weight, head_t.weight, mask, beta=1.0)[0]
        elif impl == "topk":
            loss = TopKOPD(cfg.objective, cfg.reward, 1.0).summed(head_s, head_t, h_s, mask, extra_inputs)[0] / T
        elif impl == "sampled_naive":
            ids, A = extra_inputs
            logp = torch.log_softmax(head_s(h_s), -1).gather(-1, ids[..., None])[..., 0]
            loss = -(A * logp * mask).sum() / T
        elif impl == "sampled_chunked":
            ids, A = extra_inputs
            loss = -(A * head_token_logprobs(h_s, head_s, ids, chunk=chunk_arg) * mask).sum() / T
        else:
            raise ValueError(impl)
        return loss

    n = min(8, T)  # warm-up on a few positions: first-call costs stay out of the measurement
    loss_fn(h_s[:, :n], h_t[:, :n], mask[:, :n],
            None if extra_inputs is None else tuple(x[:, :n] for x in extra_inputs), n).backward()
    h_s.grad = None
    head_s.weight.grad = None
    base = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak RSS (VmHWM) restarts from here: imports and warm-up cannot hide it
    t0 = time.perf_counter()
    loss = loss_fn(h_s, h_t, mask, extra_inputs, T)
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    value = loss.item()
    del loss
    after = _status_kb("VmRSS")  # the gradients (h_s.grad, head_s.weight.grad) are still held
    return {"impl": impl, "T": T, "loss": value, "seconds": seconds,
            "peak_extra_mib": (peak - base) / 1024, "transient_mib": (peak - after) / 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--impls", nargs="+", default=["naive", "chunked", "trl_chunked", "topk"])
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # internal: impl T
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_one(a.one[0], int(a.one[1]), a.vocab, a.hidden, a.chunk, a.k)))
        return
    rows, failed = [], []
    for T in a.lengths:
        for impl in a.impls:
            out = subprocess.run([sys.executable, __file__, "--one", impl, str(T), "--vocab",
                                  str(a.vocab), "--hidden", str(a.hidden), "--chunk", str(a.chunk),
                                  "--k", str(a.k)], capture_output=True, text=True,
                                 env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 << 10)})
            if out.returncode:
                print(out.stderr[-2000:], file=sys.stderr)
                failed.append(f"{impl} T={T}")
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nV = {a.vocab}, H = {a.hidden}, B = 1, float32, chunk = {a.chunk}, K = {a.k}, 2 threads\n")
    print("| T | implementation | fwd+bwd s | peak extra MiB | transient MiB | loss |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['T']} | {r['impl']} | {r['seconds']:.2f} | {r['peak_extra_mib']:.0f} "
              f"| {r['transient_mib']:.0f} | {r['loss']:.6f} |")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
