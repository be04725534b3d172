"""A run never loses work and never mixes records: resume bookkeeping, run-dir reuse, pruning,
and W&B failures that never stop training."""

import json
import shutil

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
