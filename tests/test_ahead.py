"""One-step-off-policy rollouts (rollout.max_staleness=1, opd_exp/loop/ahead.py)."""

import json
import math
import os
import threading
import time

import pytest
import torch

from opd_exp.config import ConfigError
from opd_exp.loop.ahead import AheadSampler
from opd_exp.train import train

from .conftest import TINY_RUN, compose

CORES = len(os.sched_getaffinity(0))
AHEAD = TINY_RUN + ["rollout.max_staleness=1", "rollout.is_cap=2", "eval.every=0"]


class VersionBackend:
    """A sampler whose 'rollouts' are the weight it holds when sampling starts and when it ends
    (it samples slowly): shows which weights each rollout came from and that they never change
    during a sampling."""

    def __init__(self):
        self.weight = None
        self.busy = threading.Event()

    def sync_weights(self, model):
        assert not self.busy.is_set(), "weights pushed while sampling"
        self.weight = model.weight.item()

    def generate(self, prompts, sampling):
        self.busy.set()
        first = self.weight
        time.sleep(0.05)
        self.busy.clear()
        return (first, self.weight, torch.rand(()).item())


def _learner_step(policy):
    with torch.no_grad():
        policy.weight += 1


def test_sampler_runs_one_step_behind_and_never_changes_weights_mid_sampling():
    policy = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        policy.weight.fill_(0.0)
    ahead = AheadSampler(VersionBackend(), policy, shares_weights=False)
    prompts = [[1, 2]]
    assert ahead.take(0, prompts) is None  # nothing started: step 0 samples in the foreground
    first = ahead.generate(prompts, None)
    assert first[:2] == (0.0, 0.0)  # W_0
    for t in range(4):  # step t: take (t > 0), start t + 1, then the learner updates W_t → W_{t+1}
        if t:
            got = ahead.take(t, prompts)
            assert got[:2] == (t - 1.0, t - 1.0)  # sampled from W_{t-1}: staleness 1
        ahead.start(t + 1, prompts, None, seed=t + 1)
        _learner_step(policy)  # overlaps the sampling; the sampler's weight must not move
        ahead.sync_weights(policy)  # only marks them
    # a foreground sampling (evaluation) waits for the background one, then uses the newest weights
    ahead.start(5, prompts, None, seed=5)
    _learner_step(policy)
    ahead.sync_weights(policy)
    assert ahead.generate(prompts, None)[:2] == (5.0, 5.0)
    # the background result is kept for its own step; another step or other prompts do not get it
    assert ahead.take(6, prompts) is None
    ahead.start(6, prompts, None, seed=6)
    assert ahead.take(6, [[9]]) is None
    ahead.close()


def test_background_draws_start_from_the_steps_seed():
    policy = torch.nn.Linear(1, 1, bias=False)
    a, b = (AheadSampler(VersionBackend(), policy, shares_weights=False) for _ in range(2))
    a.start(3, [[1]], None, seed=11)
    first = a.take(3, [[1]])[2]
    torch.rand(5)  # the main thread's own draws before the next start do not matter
    b.start(3, [[1]], None, seed=11)
    assert b.take(3, [[1]])[2] == first


def test_hf_sampler_gets_a_copy_the_learner_cannot_change_mid_sampling():
    policy = torch.nn.Linear(2, 2, bias=False)

    class Shared(VersionBackend):
        def sync_weights(self, model):
            self.model = model

        def generate(self, prompts, sampling):
            before = self.model.weight.clone()
            time.sleep(0.05)
            return torch.equal(before, self.model.weight), self.model is policy

    ahead = AheadSampler(Shared(), policy, shares_weights=True)
    ahead.sync_weights(policy)
    ahead.start(1, [[1]], None, seed=0)
    with torch.no_grad():
        policy.weight.mul_(3)  # the learner's update, during the sampling
    unchanged, is_learner = ahead.take(1, [[1]])
    assert unchanged and not is_learner
    ahead.sync_weights(policy)
    ahead.generate([[1]], None)
    assert torch.equal(ahead.copy.weight, policy.weight)  # pushed on the next use


def _records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


TIMINGS = ("seconds",)


def _no_timings(r):
    return {k: v for k, v in r.items() if not k.endswith(TIMINGS)}


def test_ahead_run_trains_with_staleness_at_most_one_and_is_reproducible(tmp_path, use_tiny_world):
    cfg = AHEAD + ["trainer.steps=4", "eval.every=2", "learner.lr=1e-2"]
    train(compose(cfg), tmp_path / "a")
    train(compose(cfg), tmp_path / "b")
    recs = [r for r in _records(tmp_path / "a") if r["step"] > 0]
    assert [r["rollout/staleness"] for r in recs] == [0.0, 1.0, 1.0, 1.0]
    for r in recs:
        assert all(math.isfinite(v) for v in r.values()), r
    # step 1 samples from the learner's own weights; later steps from the weights one update back
    assert recs[0]["rollout/logprob_mismatch"] < 1e-5
    assert all(r["rollout/logprob_mismatch"] > 1e-4 for r in recs[1:])
    assert all(r["train/is_weight_mean"] != 1.0 for r in recs[1:])
    assert "eval/avg@2" in recs[1] and "eval/avg@2" in recs[3]
    same = [_no_timings(r) for r in _records(tmp_path / "b")]
    assert [_no_timings(r) for r in _records(tmp_path / "a")] == same


def test_ahead_run_resumes(tmp_path, use_tiny_world):
    """A resumed run continues (its first step samples in the foreground: staleness 0)."""
    base = AHEAD + ["trainer.save_every=2"]
    train(compose(base + ["trainer.steps=2"]), tmp_path)
    train(compose(base + ["trainer.steps=4", "trainer.resume=true"]), tmp_path)
    recs = [r for r in _records(tmp_path) if r["step"] > 0]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert [r["rollout/staleness"] for r in recs] == [0.0, 1.0, 0.0, 1.0]


@pytest.mark.parametrize("override, key", [
    (["rollout.max_staleness=2"], "rollout.max_staleness"),
    (["rollout.is_cap=0"], "rollout.is_cap"),
    (["rollout.sync_every=2"], "rollout.sync_every"),
    (["learner=deepspeed"], "rollout.max_staleness"),
    (["objective.rollouts_from=teacher"], "rollout.max_staleness"),
    (["rollout=vllm", "rollout.temperature=0.7"], "rollout.temperature"),
    (["rollout=vllm", f"trainer.threads={CORES + 1}"], "trainer.threads"),
    (["teacher=vllm", "rollout.score_ahead=true", f"trainer.threads={CORES + 1}"], "trainer.threads"),
])
def test_ahead_refusals_name_the_field(tmp_path, use_tiny_world, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        train(compose(AHEAD + override), tmp_path)


def test_ahead_after_a_cold_start(tmp_path, use_tiny_world):
    """Cold-start steps train on teacher traces (nothing runs ahead); the first objective step
    samples in the foreground, the next ones one step ahead."""
    train(compose(AHEAD + ["schedule=cold_start", "schedule.cold_start_steps=2", "trainer.steps=4"]),
          tmp_path)
    recs = [r for r in _records(tmp_path) if r["step"] > 0]
    assert [r["schedule/cold_start"] for r in recs] == [1.0, 1.0, 0.0, 0.0]
    assert [r.get("rollout/staleness") for r in recs] == [None, None, 0.0, 1.0]


@pytest.mark.parametrize("objective", [[], ["objective=topk", "objective.k=4"]])
def test_scoring_ahead_moves_the_teacher_to_the_background_and_changes_nothing_else(
        tmp_path, use_tiny_world, monkeypatch, objective):
    """rollout.score_ahead: from step 2 on the masking and the teacher run in the
    background job (the teacher's calls are seen on the sampling thread); every record equals
    the run that scores in the foreground, timings aside."""
    from opd_exp.engines.teacher_hf import HFTeacher

    threads = []
    score = HFTeacher.score

    def spy(self, *a, **kw):
        threads.append(threading.current_thread().name)
        return score(self, *a, **kw)

    monkeypatch.setattr(HFTeacher, "score", spy)
    cfg = AHEAD + objective + ["trainer.steps=4", "objective.special_mask=true"]
    recs = {}
    for ahead in (True, False):
        threads.clear()
        train(compose(cfg + [f"rollout.score_ahead={ahead}"]), tmp_path / str(ahead))
        recs[ahead] = [r for r in _records(tmp_path / str(ahead)) if r["step"] > 0]
        on_worker = [t.startswith("rollout-ahead") for t in threads]
        assert on_worker == ([False, True, True, True] if ahead else [False] * 4), threads
    assert [_no_timings(r) for r in recs[True]] == [_no_timings(r) for r in recs[False]]
    assert [("teacher/ahead_seconds" in r) for r in recs[True]] == [False, True, True, True]
    assert all(r["rollout/ahead_seconds"] > 0 for r in recs[True][1:] + recs[False][1:])
    assert all(r["teacher/seconds"] == 0.0 for r in recs[True][1:])
    assert all(r["teacher/seconds"] > 0.0 for r in recs[False])


def test_the_teacher_is_never_called_from_two_threads_at_once(tmp_path, use_tiny_world, monkeypatch):
    """rollout.score_ahead: the first step (and the first after a resume or a cold start) scores
    its rollouts in the foreground; the next job, which scores too, starts after that — one
    teacher (an in-process vLLM engine: one caller at a time) is never asked by both threads."""
    from opd_exp.engines.teacher_hf import HFTeacher

    busy, overlaps = threading.Lock(), []
    score = HFTeacher.score

    def slow(self, *a, **kw):
        if not busy.acquire(blocking=False):
            overlaps.append(threading.current_thread().name)
            return score(self, *a, **kw)
        try:
            time.sleep(0.5)  # a slow teacher: the next job's sampling ends meanwhile
            return score(self, *a, **kw)
        finally:
            busy.release()

    monkeypatch.setattr(HFTeacher, "score", slow)
    train(compose(AHEAD + ["trainer.steps=3", "rollout.score_ahead=true"]), tmp_path)
    assert overlaps == []
