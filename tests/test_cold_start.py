"""schedule=cold_start (SPEC §2): SFT on cached, filtered teacher traces for the first steps,
then OPD in the same run; a run killed in either phase resumes in it."""

import json

import pytest

from opd_exp.config import ConfigError, validate
from opd_exp.core.types import Problem, Rollouts, Sampling, rollouts_from_samples
from opd_exp.recipes.cold_start import TeacherTraces
from opd_exp.train import train

from .conftest import TINY_RUN, compose

BASE = TINY_RUN + ["eval.every=0", "schedule=cold_start", "schedule.cold_start_steps=2"]


def _rows(run_dir):
    return [{k: v for k, v in json.loads(x).items() if not k.endswith("seconds")}
            for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_cold_start_switches_to_opd_at_the_configured_step(tmp_path, use_tiny_world):
    train(compose(BASE + ["trainer.steps=3", "schedule.filter=false"]), tmp_path)
    steps = [r for r in _rows(tmp_path) if r["step"] > 0]
    assert [r["schedule/cold_start"] for r in steps] == [1.0, 1.0, 0.0]
    assert all(r["schedule/traces"] == 4 and "reward/mean" not in r for r in steps[:2])
    assert "reward/mean" in steps[2] and "schedule/traces" not in steps[2]
    cached = [json.loads(x) for x in (tmp_path / "cold_start_traces.jsonl").read_text().splitlines()]
    assert set(cached.pop(0)) == {"made_under"}  # the settings the traces were made under
    assert len(cached) == 8 and all(c["response_ids"] for c in cached)  # 2 steps x 4 prompts


def test_cold_start_steps_may_draw_more_prompts(tmp_path, use_tiny_world):
    train(compose(BASE + ["trainer.steps=3", "schedule.filter=false",
                          "schedule.cold_start_prompts=6"]), tmp_path)
    steps = [r for r in _rows(tmp_path) if r["step"] > 0]
    assert [r.get("schedule/traces") for r in steps] == [6, 6, None]
    assert steps[2]["rollout/tokens"] > 0  # the OPD step: data.prompts_per_step x rollout.n


def test_the_objective_phase_sees_the_prompts_of_an_objective_only_run():
    from types import SimpleNamespace

    from opd_exp.data import PromptSource
    from opd_exp.loop.step import step_prompts

    pool = PromptSource([Problem(f"p{i}", "1") for i in range(50)], 4, seed=3)
    plain = SimpleNamespace(cfg=compose(), prompts=pool)
    cold = SimpleNamespace(cfg=compose(["schedule=cold_start", "schedule.cold_start_steps=5",
                                        "schedule.cold_start_prompts=8"]), prompts=pool)
    for s in range(5, 12):  # objective step s = step s - 5 of a run without the cold start
        assert step_prompts(cold, s, False) == step_prompts(plain, s - 5, False)
    firsts = [step_prompts(cold, s, True) for s in range(5)]
    assert all(len(b) == 8 for b in firsts)  # cold_start_prompts, from their own order
    assert firsts[0] != step_prompts(plain, 0, False)[:8] and firsts == [
        step_prompts(cold, s, True) for s in range(5)]


def test_the_cold_start_schedule_is_checked():
    for key, value in (("cold_start_warmup_ratio", 1.5), ("cold_start_decay", "linear")):
        with pytest.raises(ConfigError, match=f"schedule.{key}"):
            validate(compose(["schedule=cold_start", f"schedule.{key}={value}"]))
    with pytest.raises(ConfigError, match="learner.minibatches"):  # traces per step vary
        validate(compose(["schedule=cold_start", "learner.minibatches=2"]))


def test_cold_start_steps_take_their_own_learning_rate(tmp_path, use_tiny_world):
    train(compose(BASE + ["trainer.steps=4", "schedule.filter=false", "learner.lr=1e-4",
                          "schedule.cold_start_lr=3e-3", "schedule.cold_start_warmup_ratio=0.5",
                          "learner.warmup_steps=2"]), tmp_path)
    lrs = [r["train/lr"] for r in _rows(tmp_path) if r["step"] > 0]
    # the rate each step applied: the cold start's (warm-up of 1 step, then cosine over the 1
    # after it), then the objective's warm-up from the switch: 1/2, 2/2
    assert lrs == pytest.approx([3e-3, 3e-3, 5e-5, 1e-4])


@pytest.mark.parametrize("killed_after", [1, 2, 3])
def test_a_run_killed_in_either_phase_resumes_in_it(tmp_path, use_tiny_world, killed_after):
    straight, run = tmp_path / "straight", tmp_path / "run"
    base = BASE + ["trainer.save_every=1", "schedule.filter=false"]
    train(compose(base + ["trainer.steps=4"]), straight)
    train(compose(base + [f"trainer.steps={killed_after}"]), run)
    train(compose(base + ["trainer.steps=4", "trainer.resume=true"]), run)
    assert _rows(run) == _rows(straight)


class _Scripted:
    """A sampler whose k-th call returns the k-th scripted text per prompt."""

    def __init__(self, tok, texts):
        self.tok, self.texts, self.calls = tok, texts, 0

    def generate(self, prompts, sampling) -> Rollouts:
        text = self.texts[min(self.calls, len(self.texts) - 1)]
        self.calls += 1
        ids = self.tok(text, add_special_tokens=False).input_ids
        return rollouts_from_samples(prompts, [[(ids, None)] for _ in prompts], 0, [])


def test_rejected_traces_are_retried_then_dropped(tmp_path, use_tiny_world):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(use_tiny_world / "student")
    cfg = compose(["schedule=cold_start", "schedule.max_retries=2"]).schedule
    enc = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    good = "<think>1+1=2.</think> \\boxed{2}"
    sampler = _Scripted(tok, ["no box", "still none", good])  # accepted at the 2nd retry
    t = TeacherTraces(tmp_path / "t.jsonl", {}, sampler, tok, enc, enc, Sampling(), set(), cfg)
    problems, r, m = t([Problem("1+1?", "2")])
    assert m == {"schedule/traces": 1.0, "schedule/rejected": 2.0, "schedule/dropped": 0.0,
                 "schedule/kept_rejected": 0.0}
    assert tok.decode(r.response_ids_B_T[0][r.response_mask_B_T[0] > 0]) == good
    again = TeacherTraces(tmp_path / "t.jsonl", {}, _Scripted(tok, ["x"]), tok, enc, enc, Sampling(),
                          set(), cfg)  # a resumed run: from the cache, no sampling
    assert again([Problem("1+1?", "2")])[2]["schedule/rejected"] == 0 and again.sampler.calls == 0
    bad = TeacherTraces(tmp_path / "b.jsonl", {}, _Scripted(tok, ["no box"]), tok, enc, enc,
                        Sampling(), set(), cfg)
    problems, r, m = bad([Problem("1+1?", "2"), Problem("2+2?", "4")])
    assert m["schedule/rejected"] == 6 and m["schedule/dropped"] == 2
    assert m["schedule/kept_rejected"] == 2 and r.size == 2  # nothing usable: the last attempts
