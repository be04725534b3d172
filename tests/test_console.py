"""What a user sees: the run dir first, a progress bar on a terminal (plain lines otherwise), a
summary at the end, no library noise, and one line for an unknown config option."""

import os
import subprocess
import sys
from pathlib import Path

from opd_exp.runtime.console import Progress

from .conftest import TINY_RUN

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "opd_exp", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, env={**os.environ, **(env or {})})


def test_run_dir_first_then_step_lines_then_a_summary_and_no_library_noise(tmp_path, tiny_world):
    p = _cli("train", *TINY_RUN, "trainer.steps=2", "eval.every=2", f"hydra.run.dir={tmp_path}",
             env={"OPD_EXP_TOY_DIR": str(tiny_world)})
    assert p.returncode == 0, p.stderr[-2000:]
    out = p.stdout.splitlines()
    assert out[0] == f"run dir: {tmp_path}"
    assert out[1].startswith("step 0 teacher avg@2 ") and out[2].startswith("step 0 student avg@2 ")
    assert out[3].startswith("step 1/2 loss ") and out[4].startswith("step 2/2 loss ")
    assert "avg@2" in out[4]
    for line in out[3:5]:  # what a cluster log needs, and each number once
        assert " tok/s elapsed 0:00:" in line and "reward" not in line
    assert " eta 0:00:00" in out[4]
    text = "\n".join(out[5:])
    assert text.startswith("done in ") and "student avg@2" in text and "teacher" in text
    assert f"last checkpoint {tmp_path}/checkpoints/step_000002" in text
    for noise in ("Loading weights", "Writing model shards", "font_manager", "Setting accelerator"):
        assert noise not in p.stdout + p.stderr, noise


def test_summary_before_after_teacher_and_gap_recovery(tmp_path):
    import json

    from opd_exp.runtime.console import summary

    recs = [{"step": 0, "teacher/eval/avg@8": 0.75, "teacher/eval/avg@8_stderr": 0.01},
            {"step": 0, "eval/avg@8": 0.25, "eval/avg@8_stderr": 0.011},
            {"step": 1, "train/loss": 0.3},
            {"step": 2, "train/loss": 0.2, "eval/avg@8": 0.35, "eval/avg@8_stderr": 0.016}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    text = summary(tmp_path, 8, 90.0)
    assert text.splitlines()[0] == f"done in 1.5 min: {tmp_path}"
    assert ("student avg@8 0.250 ± 0.011 (step 0) → 0.350 ± 0.016 (step 2); teacher 0.750 ± 0.010;"
            " gap recovered 20%") in text


def test_progress_bar_on_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    bar = Progress(start=1, steps=3, k=8)
    bar.update(2, {"train/loss": 0.5, "train/grad_norm": 2.0, "eval/avg@8": 0.25})
    bar.update(3, {"train/loss": 0.4, "train/grad_norm": float("nan")})
    bar.close()
    err = capsys.readouterr()
    assert "3/3" in err.err and "loss=0.4" in err.err and "step 2/3" not in err.out


def test_the_reward_is_printed_only_where_it_is_not_the_loss_flipped():
    bar = Progress(start=0, steps=4, k=8, enabled=True)
    assert "reward" not in bar.fields({"train/loss": -0.25, "train/reward_mean": 0.25})
    assert bar.fields({"train/loss": 0.1, "train/reward_mean": 0.25})["reward"] == "0.2500"


def test_unknown_option_is_one_line_without_internal_entries():
    p = _cli("train", "reward=powr")
    assert p.returncode == 2
    assert p.stderr.strip() == ("error: reward=powr is not allowed: one of log_clip, log_ratio, "
                                "log_tanh, mix, power, verifiable, zscore")
    p = _cli("train", "--multirun", "reward=power,nope")
    assert p.returncode == 2 and p.stderr.strip().startswith("error: reward=nope is not allowed")


def test_eta_counts_the_steps_not_the_step_zero_evaluation(monkeypatch):
    import opd_exp.runtime.console as console

    now = [0.0]
    monkeypatch.setattr(console.time, "time", lambda: now[0])
    bar = Progress(start=0, steps=11, k=8, enabled=True)
    now[0] = 1800.0  # a 30-minute step-0 evaluation
    bar.restart_clock()
    now[0] = 1920.0  # then a 2-minute step
    assert bar.timing(1, {}) == "elapsed 0:02:00 eta 0:20:00"
