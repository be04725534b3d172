"""A learner on fixed data, for tests/test_deepspeed.py: the same 10 batches for every backend.

    python -m tests.engines.ds_probe OUT_DIR [overrides…]                       # one process
    python -m torch.distributed.run --nproc_per_node 2 -m tests.engines.ds_probe OUT_DIR \
        learner.backend=deepspeed learner.zero_stage=3 [--save-at 5] [--resume CKPT]

The batches are sampled from the initial student (seeded, identically on every rank) before the
learner exists; rank r trains on the rows of prompts r, r + W, … (as the loop shards prompts).
Rank 0 writes OUT_DIR/result.json (global loss and grad norm per step, the largest difference of
any parameter between ranks) and OUT_DIR/params.pt (the final flattened parameters).
OPD_EXP_TOY_DIR must point at a toy world.
"""

import argparse
import copy
import gc
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from opd_exp.config.registry import LEARNERS, resolve
from opd_exp.core.types import Sampling, StepBatch
from opd_exp.data import make_encoder, make_prompts
from opd_exp.engines.hf_models import load_model, load_tokenizer, save_model, stop_token_ids
from opd_exp.engines.rollout_hf import HFRollout
from opd_exp.engines.teacher_hf import HFTeacher
from opd_exp.methods import make_objective
from opd_exp.runtime import distributed
from tests.conftest import TINY_RUN, compose

STEPS = 10
FIXED = ["learner.lr=5e-3", "learner.max_grad_norm=1.0", "rollout.max_new_tokens=16",
         "data.prompts_per_step=4", "rollout.n=2"]


def fixed_batches(cfg, student, teacher_model, tok, needs: str = "sampled") -> list[StepBatch]:
    sampler = HFRollout(copy.deepcopy(student), tok, stop_token_ids(cfg.pair.student, tok))
    teacher = HFTeacher(teacher_model, cfg.learner.micro_batch_size, cfg.objective.chunk_size)
    encode = make_encoder(tok, cfg.data.chat_template)
    prompts = make_prompts(cfg.data, cfg.trainer.seed)
    out = []
    for step in range(STEPS):
        torch.manual_seed(1_000 + step)
        r = sampler.generate([encode(p.prompt) for p in prompts.batch(step)], Sampling.from_cfg(cfg.rollout))
        out.append(StepBatch(r, teacher.score(r, needs, cfg.objective.k),
                             correct_B=torch.zeros(r.size)))
    return out


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--save-at", type=int, default=0)
    ap.add_argument("--resume", type=Path, default=None)
    args = ap.parse_args()
    cfg = compose(TINY_RUN + FIXED + args.overrides)
    dist = distributed.init()
    tok = load_tokenizer(cfg.pair.student, "pair.student")
    student = load_model(cfg.pair.student, "pair.student")
    objective = make_objective(cfg.objective, cfg.reward, cfg.rollout.temperature)
    batches = fixed_batches(cfg, student, load_model(cfg.pair.teacher, "pair.teacher"), tok,
                            objective.teacher_needs)
    start = 0
    if args.resume is not None:
        saved = OmegaConf.merge(cfg.pair.student, {"path": str(args.resume / "student")})
        student.load_state_dict(load_model(saved, "resume").state_dict())
        start = args.save_at
    learner = resolve(LEARNERS[cfg.learner.backend])(cfg, student, dist)
    if args.resume is not None:
        learner.load(args.resume)
    losses, norms = [], []
    for step in range(start, STEPS):
        full = batches[step]
        mine = (full.rollouts.group_B % dist.world_size) == dist.rank
        batch = full.select(mine.nonzero()[:, 0])
        if objective.needs_old_logp:
            batch.logp_old_B_T = learner.logprobs(batch, cfg.rollout.temperature)
        batch, _ = objective.prepare(batch)
        m = dist.reduce_metrics(learner.update(batch, objective))
        losses.append(m["loss"])
        norms.append(m["grad_norm"])
        if args.save_at and step + 1 == args.save_at and args.resume is None:
            ckpt = args.out / "ckpt"
            ckpt.mkdir(parents=True, exist_ok=True)
            dist.barrier()
            learner.save(ckpt)
            if dist.is_main:
                save_model(learner.policy, tok, ckpt / "student")
            dist.barrier()
    v = flat(learner.policy)
    hi, lo = v.clone(), v.clone()
    if dist.world_size > 1:
        torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
        torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
    if dist.is_main:
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save(v, args.out / "params.pt")
        (args.out / "result.json").write_text(json.dumps({
            "start": start, "loss": losses, "grad_norm": norms,
            "rank_param_spread": (hi - lo).abs().max().item(), "world_size": dist.world_size}))
    dist.close()


if __name__ == "__main__":
    main()
    gc.collect()  # the engine's process-group references go before interpreter exit (Dist.close)
