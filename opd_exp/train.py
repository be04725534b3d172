"""The OPD training loop, written out once.

    for each step:
      prompts → student rollouts → teacher scores → objective.prepare → learner.update
      → log → (eval) → (checkpoint) → sync rollout weights

Components are built from the config by their modules' `make_*`; this file never imports an
engine (vLLM, DeepSpeed, W&B) itself.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from opd_exp import checkpoint, distributed
from opd_exp.batch import TeacherScores
from opd_exp.config import validate
from opd_exp.data import make_encoder, make_prompts
from opd_exp.evaluation import evaluate, load_benchmark, rollout_correctness
from opd_exp.learner import make_learner
from opd_exp.masking import SpecialTokenMask
from opd_exp.loggers import make_logger
from opd_exp.models import check_same_vocab, load_model, load_tokenizer, save_model, stop_token_ids
from opd_exp.objectives import StepBatch, make_objective
from opd_exp.plots import write_plots
from opd_exp.rollout import Sampling, make_rollout
from opd_exp.teacher import make_teacher


def step_seed(seed: int, step: int, purpose: int = 0, rank: int = 0) -> int:
    """Every step reseeds the global RNG: a resumed run samples exactly what it would have."""
    return (seed * 1_000_003 + step * 101 + purpose + rank * 7_919) % (2**63)


@dataclass
class Evaluator:
    """Student evaluation on the configured benchmarks; the teacher's measured once."""
    cfg: DictConfig
    tokenizer: object
    encode: object
    dist: distributed.Dist = distributed.Dist()  # several ranks: each evaluates its share

    def __post_init__(self):
        e = self.cfg.eval
        self.benchmarks = {b: load_benchmark(b, e.max_problems) for b in e.benchmarks}
        self.sampling = Sampling.from_cfg(e, n=e.k)

    def __call__(self, rollout, step: int, prefix: str = "eval") -> dict[str, float]:
        torch.manual_seed(step_seed(self.cfg.trainer.seed, step, purpose=1, rank=self.dist.rank))
        t = time.time()
        scores = evaluate(rollout, self.tokenizer, self.encode, self.benchmarks, self.sampling,
                          self.dist)
        out = {f"{prefix}/{k}": v for k, v in scores.items()}
        out[f"{prefix}/seconds"] = time.time() - t
        return out


def step_metrics(batch: StepBatch, train_metrics: dict, obj_metrics: dict,
                 on_policy: bool) -> dict[str, float]:
    """The step's train/, reward/ and rollout/ metrics (definitions: docs/metrics.md)."""
    mask = batch.mask_B_T
    out = {f"train/{k}": v for k, v in train_metrics.items()}
    out.update({f"reward/{k.removeprefix('reward_')}" if k.startswith("reward_") else f"train/{k}": v
                for k, v in obj_metrics.items()})
    if "reward_mean" in obj_metrics:
        out["train/reward_mean"] = obj_metrics["reward_mean"]
    out["rollout/response_len"] = mask.sum(-1).mean().item()
    out["rollout/tokens"] = mask.sum().item()
    out["rollout/accuracy"] = batch.correct_B.mean().item()
    r = batch.rollouts
    if on_policy and r.logp_B_T is not None and batch.logp_old_B_T is not None:
        n = mask.sum().clamp(min=1).item()
        out["rollout/logprob_mismatch"] = ((r.logp_B_T - batch.logp_old_B_T).abs() * mask).sum().item() / n
    return out


def progress_line(m: dict[str, float], step: int, steps: int, k: int) -> str:
    line = f"step {step}/{steps} loss {m['train/loss']:.4f} grad_norm {m['train/grad_norm']:.3g}"
    if "train/reward_mean" in m:
        line += f" reward {m['train/reward_mean']:.4f}"
    if f"eval/avg@{k}" in m:
        line += f" eval/avg@{k} {m[f'eval/avg@{k}']:.3f}"
    return line


def train(cfg: DictConfig, run_dir: Path) -> dict[str, float]:
    validate(cfg)
    dist = distributed.init(cfg.launcher.dist_backend)  # one plain process unless launched
    distributed.check_world(dist, cfg.launcher)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    if dist.is_main:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    # ---- components, built from the config
    tokenizer = load_tokenizer(cfg.pair.student, "pair.student")
    check_same_vocab(tokenizer, load_tokenizer(cfg.pair.teacher, "pair.teacher"))
    resume_from = checkpoint.latest(run_dir) if cfg.trainer.resume else None
    ckpt_meta = {"learner": cfg.learner.backend, "ranks": dist.world_size}  # what resume needs
    if resume_from is not None:
        checkpoint.check_resumable(resume_from, ckpt_meta)
    student_cfg = cfg.pair.student if resume_from is None else OmegaConf.merge(
        cfg.pair.student, {"path": str(resume_from / "student")})
    student = load_model(student_cfg, "pair.student").to(dist.device)
    stop_ids = stop_token_ids(student, tokenizer)
    learner = make_learner(cfg, student, dist, run_dir)
    rollout = make_rollout(cfg, learner.policy, tokenizer, stop_ids,
                           run_dir if dist.world_size == 1 else run_dir / f"rank{dist.rank}",
                           rank=dist.rank)
    teacher, teacher_rollout = make_teacher(cfg, tokenizer, stop_ids, dist.device)
    masker = SpecialTokenMask.from_cfg(cfg.objective, tokenizer, stop_ids)
    objective = make_objective(cfg)
    prompts = make_prompts(cfg)
    encode = make_encoder(tokenizer, cfg.data.chat_template, cfg.data.prompt_suffix)
    evaluator = Evaluator(cfg, tokenizer, make_encoder(tokenizer, cfg.data.chat_template,
                                                       cfg.eval.prompt_suffix), dist)
    e_every = cfg.eval.every
    sampling = Sampling.from_cfg(cfg.rollout)
    start = 0
    if resume_from is not None:
        learner.load(resume_from)
        start = checkpoint.load_step(resume_from)
        print(f"resumed from {resume_from} at step {start}")
    logger = make_logger(cfg, run_dir, OmegaConf.to_container(cfg, resolve=True),
                         resume_step=start if resume_from is not None else None, main=dist.is_main)

    def save(step: int) -> None:
        def write(d: Path) -> None:
            learner.save(d)  # collective under DeepSpeed
            if dist.is_main:
                save_model(learner.policy, tokenizer, d / "student")
        checkpoint.save(run_dir, step, write, cfg.trainer.keep_last, dist, ckpt_meta)

    if start == 0:
        if cfg.eval.teacher and e_every:
            logger.log(evaluator(teacher_rollout, 0, prefix="teacher/eval"), step=0)
        if e_every:
            logger.log(evaluator(rollout, 0), step=0)

    # ---- the loop
    last: dict[str, float] = {}
    for step in range(start, cfg.trainer.steps):
        t0 = time.time()
        torch.manual_seed(step_seed(cfg.trainer.seed, step, rank=dist.rank))
        problems = dist.shard(prompts.batch(step))  # this rank's prompts
        sampler = teacher_rollout if cfg.objective.rollouts_from == "teacher" else rollout
        rollouts = sampler.generate([encode(p.prompt) for p in problems], sampling)
        correct_B = rollout_correctness(tokenizer, rollouts, [p.answer for p in problems])
        rollouts = masker(rollouts)  # special-token masking (objective.special_mask)
        rollouts, correct_B = rollouts.to(dist.device), correct_B.to(dist.device)
        t1 = time.time()
        scores: TeacherScores = teacher.score(rollouts, objective.teacher_needs, cfg.objective.k)
        t2 = time.time()
        batch = StepBatch(rollouts, scores, correct_B=correct_B)
        if objective.needs_old_logp:
            batch.logp_old_B_T = learner.logprobs(batch, cfg.rollout.temperature)
        batch, obj_metrics = objective.prepare(batch)
        train_metrics = learner.update(batch, objective)
        rollout.sync_weights(learner.policy)
        t3 = time.time()

        metrics = step_metrics(batch, train_metrics, obj_metrics,
                               on_policy=sampler is rollout)
        metrics.update({"rollout/seconds": t1 - t0, "teacher/seconds": t2 - t1,
                        "train/seconds": t3 - t2})
        metrics = dist.reduce_metrics(metrics)  # over ranks (docs/metrics.md)
        done = step + 1
        if e_every and (done % e_every == 0 or done == cfg.trainer.steps):
            metrics.update(evaluator(rollout, done))
        logger.log(metrics, step=done)
        last = metrics
        if dist.is_main:
            print(progress_line(metrics, done, cfg.trainer.steps, cfg.eval.k), flush=True)
        if (cfg.trainer.save_every and done % cfg.trainer.save_every == 0) or done == cfg.trainer.steps:
            save(done)

    logger.finish()
    if dist.is_main:
        if cfg.logger.plots:
            write_plots(run_dir / "metrics.jsonl", run_dir, k=cfg.eval.k)
        (run_dir / "final_metrics.json").write_text(json.dumps(last, indent=2) + "\n")
    dist.close()
    return last
