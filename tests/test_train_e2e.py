"""A tiny end-to-end run (tiny models, few steps): finite metrics, reloadable checkpoint, exact resume."""

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd_exp.runtime import checkpoint
from opd_exp.__main__ import CONF_DIR
from opd_exp.config import ConfigError
from opd_exp.train import train

from .conftest import TINY_RUN, compose


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _params(path):
    model = AutoModelForCausalLM.from_pretrained(path)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("reward", ["log_ratio", "power"])
def test_tiny_run_finite_metrics_and_reloadable_checkpoint(tmp_path, use_tiny_world, reward):
    cfg = compose(TINY_RUN + [f"reward={reward}", "trainer.steps=3", "eval.every=2",
                              "trainer.save_every=2", "logger.plots=true"])
    last = train(cfg, tmp_path)
    assert math.isfinite(last["train/loss"]) and math.isfinite(last["train/grad_norm"])
    recs = _records(tmp_path)
    assert [r["step"] for r in recs if "eval/avg@2" in r] == [0, 2, 3]
    assert any("teacher/eval/avg@2" in r for r in recs)
    for key in ("train/loss", "train/grad_norm", "train/reward_mean", "rollout/response_len"):
        assert all(math.isfinite(r[key]) for r in recs if r["step"] > 0), key
    latest = checkpoint.latest(tmp_path)
    assert latest.name == "step_000003" and checkpoint.load_step(latest) == 3
    model = AutoModelForCausalLM.from_pretrained(latest / "student")
    assert model.num_parameters() > 0
    assert (tmp_path / "grad_norm.png").stat().st_size > 0 and (tmp_path / "avg2.png").exists()
    assert (tmp_path / "config.yaml").exists()


def test_resume_continues_exactly(tmp_path, use_tiny_world):
    """4 steps straight == 2 steps, 'killed', resumed to 4: same weights, same logged numbers."""
    base = TINY_RUN + ["eval.every=0", "trainer.save_every=2", "rollout.temperature=1.3"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(compose(base + ["trainer.steps=4"]), straight)
    train(compose(base + ["trainer.steps=2"]), resumed)  # "killed" after its step-2 checkpoint
    train(compose(base + ["trainer.steps=4", "trainer.resume=true"]), resumed)

    a, b = _params(straight / "checkpoints/step_000004/student"), _params(
        resumed / "checkpoints/step_000004/student")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = _records(straight), _records(resumed)
    assert [r["step"] for r in rb] == [0, 1, 2, 3, 4]  # no duplicated or lost records
    assert rb[0] == {"step": 0, "data/prompts": 64, "data/duplicates_exact": 0,
                     "data/skipped_too_long": 0}
    drop = lambda r: {k: v for k, v in r.items() if not k.endswith("seconds")}  # noqa: E731
    assert [drop(r) for r in ra] == [drop(r) for r in rb]


def test_resume_with_another_learner_is_one_clear_error(tmp_path):
    checkpoint.save(tmp_path, 2, lambda d: None, keep_last=1, meta={"learner": "deepspeed", "ranks": 2})
    ckpt = checkpoint.latest(tmp_path)
    checkpoint.check_resumable(ckpt, {"learner": "deepspeed", "ranks": 2})
    with pytest.raises(ConfigError) as e:
        checkpoint.check_resumable(ckpt, {"learner": "torch", "ranks": 1})
    assert str(e.value) == ("trainer.resume=True is not allowed: step_000002 was written with "
                            "learner deepspeed (this run: torch), ranks 2 (this run: 1)")


def test_checkpoint_writes_are_atomic(tmp_path):
    def write_then_die(d):
        (d / "partial").write_text("x")
        raise KeyboardInterrupt

    checkpoint.save(tmp_path, 1, lambda d: (d / "ok").write_text("1"), keep_last=2)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 2, write_then_die, keep_last=2)
    assert checkpoint.latest(tmp_path).name == "step_000001"  # the half-written one is ignored
    checkpoint.save(tmp_path, 2, lambda d: None, keep_last=1)
    assert checkpoint.latest(tmp_path).name == "step_000002"
    assert not (tmp_path / "checkpoints/step_000001").exists()  # keep_last prunes


def test_cli_multirun_sweeps_alpha(tmp_path, use_tiny_world):
    """`train --multirun … reward.alpha=a,b` runs one job per value, each with its own run dir."""
    import os
    import subprocess
    import sys

    p = subprocess.run(
        [sys.executable, "-m", "opd_exp", "train", "--multirun", "+experiment=powerOPD_toy",
         "reward.alpha=0.5,2", "trainer.steps=1", "eval.every=0", *TINY_RUN,
         f"hydra.sweep.dir={tmp_path}"],
        capture_output=True, text=True, timeout=600, env={**os.environ})
    assert p.returncode == 0, p.stderr[-2000:]
    for job, alpha in (("0", 0.5), ("1", 2.0)):
        cfg = (tmp_path / job / "config.yaml").read_text()
        assert f"alpha: {alpha}" in cfg
        assert math.isfinite(_records(tmp_path / job)[-1]["train/loss"])


TOY_EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*_toy.yaml"))
# the tiny world's models for an experiment whose pair it lacks: the Qwen3-vocabulary student
# under the Qwen3.6-vocabulary teacher (the shipped pair's student is on Qwen2.5's)
TINY_PAIRS = {"cross_tokenizer_toy": ["pair.student.path=toy:qwen3_student"]}


def two_finite_steps(cfg, run_dir: Path) -> list[dict]:
    """Train `cfg` (2 steps) into `run_dir`; its two step records, every value finite."""
    train(cfg, run_dir)
    recs = [r for r in _records(run_dir) if r["step"] > 0]
    assert len(recs) == 2
    for r in recs:
        bad = {k: v for k, v in r.items() if v is None or not math.isfinite(v)}
        assert not bad and "train/loss" in r and "train/grad_norm" in r, bad
    return recs


@pytest.mark.parametrize("name", TOY_EXPERIMENTS)
def test_every_toy_experiment_runs_with_finite_metrics(tmp_path, use_tiny_world, name):
    cfg = compose([f"+experiment={name}", *TINY_RUN, "trainer.steps=2", "eval.every=2",
                   "eval.teacher=false", *TINY_PAIRS.get(name, [])])
    for r in two_finite_steps(cfg, tmp_path):
        assert ("train/masked_tokens" in r) == cfg.objective.special_mask
        assert ("xtok/aligned_share" in r) == (name == "cross_tokenizer_toy")


@pytest.mark.parametrize("objective,rollouts_from,reweighted", [
    ("sampled_token", "student", True), ("sampled_token", "teacher", False),
    ("full_vocab", "student", False)])
def test_importance_correction_only_on_the_students_own_rollouts(tmp_path, use_tiny_world,
                                                                 objective, rollouts_from,
                                                                 reweighted):
    """rollout.is_cap reweights the sampled-token objective's on-policy rollouts (engine vs
    learner); teacher-written (off-policy) rollouts and objectives without old log-probs are
    never reweighted: the step decides, not the objective."""
    cfg = compose([*TINY_RUN, "trainer.steps=1", "eval.every=0", "rollout.is_cap=2.0",
                   f"objective={objective}", f"objective.rollouts_from={rollouts_from}"])
    train(cfg, tmp_path)
    (rec,) = [r for r in _records(tmp_path) if r["step"] > 0]
    if reweighted:
        assert 0 < rec["train/is_weight_mean"] <= 2.0 and rec["train/is_truncated_frac"] >= 0
    else:
        assert "train/is_weight_mean" not in rec and "train/is_truncated_frac" not in rec


def test_run_stops_after_max_skipped_steps_with_weights_intact(tmp_path, use_tiny_world,
                                                               monkeypatch):
    """Every loss NaN: each step is skipped and counted (train/skipped_steps), the run stops with
    one line after trainer.max_skipped_steps in a row, and the student's weights never change."""
    from opd_exp.config import RunStopped
    from opd_exp.methods.sampled_token import SampledTokenOPD

    real_loss = SampledTokenOPD.loss
    monkeypatch.setattr(SampledTokenOPD, "loss", lambda self, policy, mb, n: (
        lambda out: (out[0] * float("nan"), out[1]))(real_loss(self, policy, mb, n)))
    cfg = compose([*TINY_RUN, "trainer.steps=5", "eval.every=0", "trainer.save_every=1",
                   "trainer.max_skipped_steps=2"])
    with pytest.raises(RunStopped, match=r"step 2: the gradient was not finite .* 2 steps in a row"):
        train(cfg, tmp_path)
    recs = [r for r in _records(tmp_path) if r["step"] > 0]
    assert [r["step"] for r in recs] == [1, 2] and all(r["train/skipped_steps"] == 1 for r in recs)
    start = _params(use_tiny_world / "student")
    saved = _params(tmp_path / "checkpoints/step_000001/student")
    assert all(torch.equal(start[k], saved[k]) for k in start)
