"""The GPU check: what the CPU suite cannot see, on the first GPU at hand (scripts/gpu_check.sh).

    python scripts/gpu_check.py --out docs/gpu_check.md            # on a GPU (≤ 8 min on one H100)
    python scripts/gpu_check.py --device cpu --small --out /tmp/x.md   # the script itself, on CPU

Needs torch and transformers as installed, the package's light dependencies (omegaconf, hydra-core;
scripts/gpu_check.sh installs them from a wheel folder, no network) and, for the ZeRO-2 row,
deepspeed. No vLLM. One table, one row per check: the largest error against the reference and the
tolerance; exit 1 on any mismatch.

1. every objective's loss and gradients through the learner's own path (HFPolicy: the head alone,
   the fused top-K and full-vocabulary losses), on a random Qwen3 at the real Qwen3 vocabulary
   (151,936 rows), in float32 and bfloat16 on the device, against the same maths in float64 on
   the CPU;
2. HF rollouts on the device, then torch-learner updates: the sampler's log-probs against the
   learner's, finite losses;
3. DeepSpeed ZeRO-2 on one GPU (bf16, fp32 master weights) against the torch learner (fp32);
4. the memory plan against torch.cuda.max_memory_allocated for one update of a ~0.5B random Qwen3.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import AutoModelForCausalLM, Qwen3Config  # noqa: E402

from opd_exp.config import schema_cfg  # noqa: E402
from opd_exp.core.types import Rollouts, StepBatch  # noqa: E402
from opd_exp.engines.hf_policy import HFPolicy  # noqa: E402
from opd_exp.engines.teacher_hf import HFTeacher  # noqa: E402
from opd_exp.methods import make_objective  # noqa: E402

ROWS: list[tuple[str, str, str, float, float, bool]] = []  # check, device, dtype, error, tol, ok


def row(check: str, device, dtype: str, error: float, tol: float) -> None:
    ok = math.isfinite(error) and error <= tol
    ROWS.append((check, str(device), dtype, error, tol, ok))
    print(f"{'ok ' if ok else 'BAD'} {check:58s} {str(device):7s} {dtype:9s} {error:.3g} (≤ {tol:g})", flush=True)


def qwen3(H: int, I: int, L: int, heads: int, kv: int, V: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    c = Qwen3Config(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                    num_attention_heads=heads, num_key_value_heads=kv, head_dim=max(32, H // heads),
                    max_position_embeddings=4096, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(c, attn_implementation="sdpa")


def random_rollouts(B: int, P: int, T: int, V: int, seed: int = 0) -> Rollouts:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T)
    mask[0, T // 2:] = 0  # a shorter response
    return Rollouts(prompt_ids_B_P=torch.randint(0, V, (B, P), generator=g), prompt_mask_B_P=torch.ones(B, P),
                    response_ids_B_T=torch.randint(0, V, (B, T), generator=g), response_mask_B_T=mask,
                    group_B=torch.arange(B))


def loss_and_grads(student, teacher, r: Rollouts, objective: str, device, dtype) -> tuple[float, torch.Tensor]:
    """The objective's loss and the flat gradient, the models moved to `device` in `dtype`."""
    s, t = copy.deepcopy(student).to(device, dtype), copy.deepcopy(teacher).to(device, dtype)
    cfg = schema_cfg({"objective": {"name": objective, "k": 16}})
    obj = make_objective(cfg.objective, cfg.reward, 1.0)
    rd = r.to(device)
    needs = {"sampled_token": "sampled", "topk": "topk", "full_vocab": "hidden"}[objective]
    scores = HFTeacher(t, 4, 64).score(rd, needs, 16)
    view = HFPolicy(s)
    batch = StepBatch(rd, scores)
    with torch.no_grad():
        batch.logp_old_B_T = view.token_logprobs(rd)
    batch, _ = obj.prepare(batch)
    s.zero_grad()
    loss, _ = obj.loss(view, batch, float(rd.response_mask_B_T.sum()))
    loss.backward()
    grad = torch.cat([p.grad.detach().double().cpu().flatten() for p in s.parameters() if p.grad is not None])
    return float(loss), grad


def check_objectives(device, small: bool) -> None:
    V = 512 if small else 151936
    student = qwen3(128, 256, 2, 4, 2, V, seed=0)
    teacher = qwen3(128, 256, 2, 4, 2, V, seed=1)
    r = random_rollouts(4, 16, 48 if small else 256, V)
    for objective in ("sampled_token", "topk", "full_vocab"):
        ref_loss, ref_grad = loss_and_grads(student, teacher, r, objective, "cpu", torch.float64)
        for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 0.1)):
            loss, grad = loss_and_grads(student, teacher, r, objective, device, dtype)
            err = max(abs(loss - ref_loss) / max(abs(ref_loss), 1e-6),
                      float((grad - ref_grad).norm() / ref_grad.norm().clamp(min=1e-12)))
            row(f"{objective}: loss and gradient, relative to float64", device, str(dtype).split(".")[1], err, tol)


def check_rollouts_and_torch_learner(device, small: bool) -> None:
    from opd_exp.engines.learner_torch import TorchLearner
    from opd_exp.engines.rollout_hf import HFRollout
    from opd_exp.core.types import Sampling

    V = 512 if small else 151936

    class Tok:  # what HFRollout reads of a tokenizer
        pad_token_id = 0

        def __len__(self):
            return V

    model = qwen3(128, 256, 2, 4, 2, V, seed=0).to(device)
    teacher = qwen3(128, 256, 2, 4, 2, V, seed=1).to(device)
    cfg = schema_cfg({"learner": {"lr": 1e-3, "micro_batch_size": 8}})
    learner = TorchLearner(model, cfg.learner)
    obj = make_objective(cfg.objective, cfg.reward, 1.0)
    rollout = HFRollout(model, Tok(), {V - 1}, batch_size=16)
    worst, losses = 0.0, []
    for step in range(3):
        torch.manual_seed(step)
        r = rollout.generate([[1, 2, 3, 4 + step], [5, 6, 7]], Sampling(n=4, max_new_tokens=32)).to(device)
        batch = StepBatch(r, HFTeacher(teacher, 8, 64).score(r, "sampled"))
        batch.logp_old_B_T = learner.logprobs(batch, 1.0)
        m = r.response_mask_B_T.bool()
        worst = max(worst, float((batch.logp_old_B_T - r.logp_B_T.to(device))[m].abs().max()))
        batch, _ = obj.prepare(batch)
        losses.append(learner.update(batch, obj)["loss"])
        rollout.sync_weights(learner.policy)
    row("HF rollouts: sampler vs learner log-probs (max |diff|)", device, "float32", worst, 1e-3)
    row("torch learner: 3 updates, losses finite (1 = not)", device, "float32",
        float(not all(math.isfinite(x) for x in losses)), 0)


def check_deepspeed_zero2(device) -> None:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        print("skip: deepspeed is not installed (scripts/gpu_check.sh installs it from the wheel folder)")
        return
    from opd_exp.engines.learner_deepspeed import DeepSpeedLearner
    from opd_exp.engines.learner_torch import TorchLearner
    from opd_exp.runtime import distributed

    dist = distributed.init("auto", group_of_one=True)
    V = 4096
    base, teacher = qwen3(128, 256, 2, 4, 2, V, seed=0), qwen3(128, 256, 2, 4, 2, V, seed=1).to(device)
    r = random_rollouts(8, 16, 64, V).to(device)
    curves = {}
    for name, lc in (("torch", {"backend": "torch"}),
                     ("zero2", {"backend": "deepspeed", "zero_stage": 2, "precision": "bf16"})):
        cfg = schema_cfg({"learner": {"lr": 1e-3, "micro_batch_size": 4, **lc}})
        model = copy.deepcopy(base).to(device)
        learner = (TorchLearner(model, cfg.learner) if name == "torch"
                   else DeepSpeedLearner(model, cfg.learner, dist, 8))
        obj = make_objective(cfg.objective, cfg.reward, 1.0)
        losses = []
        for _ in range(4):
            batch = StepBatch(r, HFTeacher(teacher, 8, 64).score(r, "sampled"))
            batch.logp_old_B_T = learner.logprobs(batch, 1.0)
            batch, _ = obj.prepare(batch)
            losses.append(learner.update(batch, obj)["loss"])
        curves[name] = losses
    err = max(abs(a - b) for a, b in zip(curves["zero2"], curves["torch"]))
    row("DeepSpeed ZeRO-2 bf16 vs torch learner fp32: 4 losses", device, "bfloat16", err, 0.05)


def check_plan_against_the_allocator(device) -> None:
    if device.type != "cuda":
        print("skip: the plan against torch.cuda.max_memory_allocated needs CUDA")
        return
    from opd_exp.engines.learner_torch import TorchLearner
    from opd_exp.runtime.memory_plan import GIB, activations, learner_state, shape_from_config

    model = qwen3(1024, 3072, 28, 16, 8, 151936, seed=0)  # Qwen3-0.6B's shape
    rows, per_row = 4, 1024
    cfg = schema_cfg({"learner": {"micro_batch_size": rows, "gradient_checkpointing": False},
                      "rollout": {"max_new_tokens": per_row * 3 // 4}, "plan": {"prompt_tokens": per_row // 4}})
    shape = shape_from_config("0.6B", model.config.to_dict())
    want = sum(learner_state(cfg, shape, 1).values()) + sum(activations(cfg, shape, False).values())
    model.to(device)
    torch.cuda.reset_peak_memory_stats()
    learner = TorchLearner(model, cfg.learner)
    obj = make_objective(cfg.objective, cfg.reward, 1.0)
    r = random_rollouts(rows, per_row // 4, per_row * 3 // 4, 151936)
    r.response_mask_B_T[:] = 1
    r = r.to(device)
    from opd_exp.core.types import TeacherScores

    batch = StepBatch(r, TeacherScores(logp_B_T=torch.zeros(r.response_ids_B_T.shape, device=device)))
    batch.logp_old_B_T = learner.logprobs(batch, 1.0)
    batch, _ = obj.prepare(batch)
    learner.update(batch, obj)
    got = torch.cuda.max_memory_allocated()
    row(f"plan {want / GIB:.2f} GiB vs max allocated {got / GIB:.2f} GiB: |1 - ratio|", device, "float32",
        abs(1 - want / got), 0.25)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="small vocabulary (the script on CPU)")
    ap.add_argument("--out", type=Path, default=Path("docs/gpu_check.md"))
    a = ap.parse_args()
    device = torch.device(a.device)
    t0 = time.time()
    check_objectives(device, a.small)
    check_rollouts_and_torch_learner(device, a.small)
    check_deepspeed_zero2(device)
    check_plan_against_the_allocator(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    import transformers

    lines = [f"# GPU check: {name}", "",
             f"`python scripts/gpu_check.py --device {a.device}{' --small' if a.small else ''}`; torch "
             f"{torch.__version__}, transformers {transformers.__version__}; {time.time() - t0:.0f} s.", "",
             "| check | device | dtype | error | tolerance | ok |", "|---|---|---|---|---|---|"]
    lines += [f"| {c} | {d} | {t} | {e:.3g} | {tol:g} | {'yes' if ok else '**no**'} |" for c, d, t, e, tol, ok in ROWS]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")
    return 0 if all(r[-1] for r in ROWS) else 1


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    sys.exit(main())
