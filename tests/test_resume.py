"""A run never loses work and never mixes records: resume bookkeeping, run-dir reuse, pruning,
and W&B failures that never stop training."""

import json
import shutil
from pathlib import Path

import pytest

from opd_exp.config import ConfigError
from opd_exp.runtime import checkpoint
from opd_exp.train import train

from .conftest import TINY_RUN, compose

BASE = TINY_RUN + ["eval.every=0"]


def _rows(run_dir):
    drop = ("seconds",)
    return [{k: v for k, v in json.loads(line).items() if not k.endswith(drop)}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_without_a_checkpoint_starts_over_without_duplicate_rows(tmp_path, use_tiny_world):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train(compose(BASE + ["trainer.steps=2"]), straight)
    train(compose(BASE + ["trainer.steps=2"]), killed)
    shutil.rmtree(killed / "checkpoints")  # as if killed before its first checkpoint
    train(compose(BASE + ["trainer.steps=2", "trainer.resume=true"]), killed)
    assert _rows(killed) == _rows(straight)


def test_a_torn_last_line_does_not_block_resume(tmp_path, use_tiny_world):
    straight, run = tmp_path / "straight", tmp_path / "run"
    train(compose(BASE + ["trainer.steps=3", "trainer.save_every=1"]), straight)
    train(compose(BASE + ["trainer.steps=2", "trainer.save_every=1"]), run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "train/lo')  # killed mid-write
    train(compose(BASE + ["trainer.steps=3", "trainer.save_every=1", "trainer.resume=true"]), run)
    assert _rows(run) == _rows(straight)


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    checkpoint.save(tmp_path, 9, lambda d: None, keep_last=1)  # an old run's later checkpoint
    checkpoint.save(tmp_path, 1, lambda d: None, keep_last=1)
    checkpoint.save(tmp_path, 2, lambda d: None, keep_last=1)
    assert checkpoint.latest(tmp_path).name == "step_000002"
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert names == ["step_000002", "step_000009"]


def test_a_fresh_run_in_a_used_run_dir_is_refused_unless_told(tmp_path, use_tiny_world):
    train(compose(BASE + ["trainer.steps=1"]), tmp_path)
    with pytest.raises(ConfigError, match=r"^trainer.resume=False is not allowed: .* holds a run"):
        train(compose(BASE + ["trainer.steps=1"]), tmp_path)
    train(compose(BASE + ["trainer.steps=2", "trainer.overwrite=true"]), tmp_path)
    assert [r["step"] for r in _rows(tmp_path)] == [0, 1, 2]
    assert checkpoint.latest(tmp_path).name == "step_000002"


def test_resuming_a_finished_run_keeps_its_final_metrics(tmp_path, use_tiny_world):
    train(compose(BASE + ["trainer.steps=2"]), tmp_path)
    before = (tmp_path / "final_metrics.json").read_text()
    train(compose(BASE + ["trainer.steps=2", "trainer.resume=true"]), tmp_path)
    assert (tmp_path / "final_metrics.json").read_text() == before != "{}\n"
    assert [r["step"] for r in _rows(tmp_path)] == [0, 1, 2]


def test_resume_with_other_maths_is_refused_in_one_line(tmp_path, use_tiny_world):
    train(compose(BASE + ["trainer.steps=1"]), tmp_path)
    with pytest.raises(ConfigError) as e:
        train(compose(BASE + ["trainer.steps=2", "trainer.resume=true", "learner.lr=0.01",
                              "reward=power"]), tmp_path)
    msg = str(e.value)
    assert msg.startswith("trainer.resume=True is not allowed: step_000001 was trained with")
    assert "learner.lr (0.0005 → 0.01)" in msg and "reward.name ('log_ratio' → 'power')" in msg
    assert "\n" not in msg
    # what does not change the maths may change (more steps, another eval schedule) …
    train(compose(BASE + ["trainer.steps=2", "trainer.resume=true", "eval.every=2"]), tmp_path)
    # … and the rest when asked for explicitly
    train(compose(BASE + ["trainer.steps=3", "trainer.resume=true", "learner.lr=0.01",
                          "trainer.allow_config_change=true"]), tmp_path)
    assert [r["step"] for r in _rows(tmp_path) if r["step"] > 0] == [1, 2, 3]


@pytest.mark.parametrize("fails_at", ["init", "log"])
def test_wandb_failing_never_stops_training(tmp_path, use_tiny_world, monkeypatch, capsys,
                                            fails_at):
    import wandb

    class Run:
        id = "x"

        def define_metric(self, *a, **k):
            pass

        def log(self, *a, **k):
            raise ConnectionError("no network")

        def finish(self):
            pass

    def init(**kw):
        if fails_at == "init":
            raise wandb.errors.UsageError("api_key not configured (no-tty)")
        return Run()

    monkeypatch.setattr(wandb, "init", init)
    cfg = compose([*BASE, "trainer.steps=2", "logger.mode=online"])
    last = train(cfg, tmp_path)
    assert last["train/loss"] == last["train/loss"]
    err = capsys.readouterr().err
    assert err.count("warning: W&B") == 1 and f"W&B {fails_at} failed" in err
    assert [r["step"] for r in _rows(tmp_path)] == [0, 1, 2]


@pytest.mark.slow
def test_sigkill_at_three_moments_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_world):
    """Killed before the first checkpoint, inside a checkpoint save, between saves: each resumed
    run ends with the same metrics.jsonl rows (timings aside) and the same final weights."""
    import os
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OPD_EXP_TOY_DIR": str(tiny_world)}
    args = [*BASE, "eval.every=2", "trainer.steps=4", "trainer.save_every=2", "logger.mode=disabled"]

    def run(cmd, run_dir, *extra):
        return subprocess.run([sys.executable, "-m", *cmd, *args, *extra, f"hydra.run.dir={run_dir}"],
                              cwd=root, env=env, capture_output=True, text=True, timeout=600)

    straight = tmp_path / "straight"
    assert run(["opd_exp", "train"], straight).returncode == 0
    weights = lambda d: load_file(d / "checkpoints/step_000004/student/model.safetensors")  # noqa: E731
    for name, where, at in (("before_first_checkpoint", "step", 1), ("inside_save", "publish", 4),
                            ("between_saves", "step", 3)):
        d = tmp_path / name
        killed = run(["tests.engines.kill_probe", where, str(at), "--"], d)
        assert killed.returncode == -9, (name, killed.stderr[-2000:])
        resumed = run(["opd_exp", "train"], d, "trainer.resume=true")
        assert resumed.returncode == 0, (name, resumed.stderr[-2000:])
        assert _rows(d) == _rows(straight), name
        a, b = weights(straight), weights(d)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_overwrite_deletes_nothing_before_the_new_run_passes_its_checks(tmp_path, use_tiny_world):
    train(compose(BASE + ["trainer.steps=1"]), tmp_path)
    with pytest.raises(ConfigError, match="^objective.k="):
        train(compose(BASE + ["trainer.overwrite=true", "objective=topk", "objective.k=100000"]),
              tmp_path)
    assert checkpoint.latest(tmp_path).name == "step_000001" and _rows(tmp_path)


def test_a_config_key_added_since_the_checkpoint_is_not_a_change(tmp_path):
    import yaml

    ckpt = tmp_path / "step_000002"
    ckpt.mkdir()
    (ckpt / "config.yaml").write_text(yaml.safe_dump({"learner": {"lr": 0.1, "micro_batch_size": 4}}))
    checkpoint.check_same_maths(ckpt, {"learner": {"lr": 0.1, "micro_batch_size": 8,
                                                   "a_new_key": 1.0}})
    with pytest.raises(ConfigError, match=r"learner.lr \(0.1 → 0.2\)"):
        checkpoint.check_same_maths(ckpt, {"learner": {"lr": 0.2}})


def test_a_resume_that_changes_the_sampling_policy_lag_is_refused(tmp_path):
    """rollout.max_staleness decides which weights sample a step's rollouts: another value is
    other maths; learner.packing gives the same loss and gradients: not."""
    import yaml

    ckpt = tmp_path / "step_000002"
    ckpt.mkdir()
    saved = {"rollout": {"max_staleness": 1}, "learner": {"packing": False}}
    (ckpt / "config.yaml").write_text(yaml.safe_dump(saved))
    checkpoint.check_same_maths(ckpt, {"rollout": {"max_staleness": 1}, "learner": {"packing": True}})
    with pytest.raises(ConfigError, match=r"rollout.max_staleness \(1 → 0\)"):
        checkpoint.check_same_maths(ckpt, {"rollout": {"max_staleness": 0}, "learner": {"packing": False}})
