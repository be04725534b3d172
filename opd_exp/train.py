"""The OPD training loop, written out once.

    build the run (components from the config; opd_exp/loop/build.py)
    evaluate the teacher and the student at step 0
    for each step: batch, metrics = run_step(run, step)      (opd_exp/loop/step.py)
                   (parameter diagnostics) → (evaluate) → log → (checkpoint)
    plots, final_metrics.json

This file never imports an engine (vLLM, DeepSpeed, W&B): docs/architecture.md.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from omegaconf import DictConfig

from opd_exp.config import RunStopped, validate, validate_training
from opd_exp.loop.build import Run, build, save_checkpoint
from opd_exp.loop.step import run_step
from opd_exp.runtime import distributed, memory_plan
from opd_exp.runtime.console import Progress, summary
from opd_exp.runtime.plots import write_plots


def train(cfg: DictConfig, run_dir: Path) -> dict[str, float]:
    t0 = time.time()
    validate(cfg)
    validate_training(cfg)
    memory_plan.check_fits(cfg, is_main=int(os.environ.get("RANK", 0)) == 0)  # before any weight
    # one plain process unless launched (DeepSpeed: a group of one rank)
    dist = distributed.init(cfg.launcher.dist_backend, group_of_one=cfg.learner.backend == "deepspeed")
    if dist.is_main:
        print(f"run dir: {run_dir}", flush=True)
    distributed.check_world(dist, cfg.launcher)
    run = build(cfg, run_dir, dist)
    steps, every = cfg.trainer.steps, cfg.eval.every
    progress = Progress(run.start, steps, cfg.eval.k, enabled=dist.is_main)
    if run.start == 0:
        run.logger.log(run.prompts.stats(), step=0)  # data/prompts, data/skipped_*
    if run.start == 0 and every:
        evals = [(run.teacher_rollout, "teacher/eval")] if cfg.eval.teacher else []
        for rollout, prefix in evals + [(run.rollout, "eval")]:
            metrics = run.evaluator(rollout, 0, prefix=prefix)
            run.logger.log(metrics, step=0)
            progress.evaluation(metrics)  # printed: a cluster log shows where the run started
    progress.restart_clock()  # elapsed / ETA of the steps alone

    last: dict[str, float] = {}
    bad_in_a_row = 0
    for step in range(run.start, steps):
        batch, metrics = run_step(run, step)
        done = step + 1
        metrics.update(run.diag.after_update(done, run.learner.policy))  # diag/param/*
        bad_in_a_row = bad_in_a_row + 1 if metrics.get("train/skipped_steps", 0) > 0 else 0
        if every and (done % every == 0 or done == steps):
            metrics.update(run.evaluator(run.rollout, done))
        run.logger.log(metrics, step=done)
        last = metrics
        progress.update(done, metrics)
        if bad_in_a_row >= cfg.trainer.max_skipped_steps:
            progress.close()
            run.logger.finish()
            raise RunStopped(f"step {done}: the gradient was not finite (NaN/inf loss or gradient) "
                             f"in {bad_in_a_row} steps in a row (trainer.max_skipped_steps="
                             f"{cfg.trainer.max_skipped_steps}); those updates were skipped, "
                             "the weights and the last checkpoint are intact")
        if (cfg.trainer.save_every and done % cfg.trainer.save_every == 0) or done == steps:
            save_checkpoint(run, done)
    progress.close()
    finish(run, last)
    if dist.is_main:
        print(summary(run_dir, cfg.eval.k, time.time() - t0), flush=True)
    return last


def finish(run: Run, last: dict[str, float]) -> None:
    """Close the loggers; rank 0 writes the plots and final_metrics.json (a resumed run that had
    nothing left to do keeps the one it has)."""
    run.logger.finish()
    if run.dist.is_main:
        run.diag.finish()  # diag/locking.json
        if run.cfg.logger.plots:
            write_plots(run.run_dir / "metrics.jsonl", run.run_dir, k=run.cfg.eval.k)
        final = run.run_dir / "final_metrics.json"
        if last or not final.exists():
            final.write_text(json.dumps(last, indent=2) + "\n")
    run.dist.barrier()  # every rank past its last collective: shutting vLLM down may end the group
    run.close_engines()
    run.dist.close()
