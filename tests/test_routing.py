"""Multi-teacher OPD (pair.teachers, pair.routes): each prompt's rows are scored by the teacher
its tag routes it to, the scores come back in row order, and a run trains from two teachers."""

import json

import pytest
import torch

from opd_exp.config import ConfigError, schema_cfg, validate
from opd_exp.core.types import Problem, Rollouts, TeacherScores
from opd_exp.loop.routing import Teachers

from .conftest import TINY_RUN, compose


class Fake:
    """A teacher whose log-prob of every token is its own constant; it records the rows it saw."""

    def __init__(self, value: float):
        self.value, self.seen = value, []

    def score(self, rollouts: Rollouts, needs: str, k: int = 0) -> TeacherScores:
        ids = rollouts.response_ids_B_T
        self.seen.append(ids[:, 0].tolist())
        return TeacherScores(logp_B_T=torch.full(ids.shape, self.value),
                             topk_idx_B_T_K=ids[..., None].repeat(1, 1, k))


def rollouts(B: int, T: int = 3) -> Rollouts:
    ids = torch.arange(B)[:, None].repeat(1, T)  # row b's tokens are all b
    return Rollouts(prompt_ids_B_P=torch.zeros(B, 2, dtype=torch.long), prompt_mask_B_P=torch.ones(B, 2),
                    response_ids_B_T=ids, response_mask_B_T=torch.ones(B, T),
                    group_B=torch.arange(B) // 2)  # 2 rows per problem


def test_each_prompts_rows_go_to_its_teacher_and_come_back_in_order():
    main, math, code = Fake(-1.0), Fake(-2.0), Fake(-3.0)
    t = Teachers({"main": main, "math": math, "code": code}, {"L1": "math", "py": "code"},
                 {"main": lambda s: [1], "math": lambda s: [2], "code": lambda s: [3]})
    problems = [Problem("a", "1", "py"), Problem("b", "1", "L1"), Problem("c", "1", "L9"),
                Problem("d", "1", "L1")]
    scores, m = t.score(problems, rollouts(8), "topk", 2)  # 2 rows per problem
    assert code.seen == [[0, 1]] and math.seen == [[2, 3, 6, 7]] and main.seen == [[4, 5]]
    assert scores.logp_B_T[:, 0].tolist() == [-3, -3, -2, -2, -1, -1, -2, -2]
    assert torch.equal(scores.topk_idx_B_T_K[:, 0, 0], torch.arange(8))  # each row its own
    assert (m["teacher/math/share"], m["teacher/code/share"], m["teacher/main/share"]) == (0.5, 0.25, 0.25)
    _, m = t.score(problems, rollouts(8), "sampled", 0)
    assert m["teacher/code/logq_mean"] == -3.0
    # a rank whose prompts give a teacher no rows logs the same keys (the ranks' lists must match)
    _, none = t.score([Problem("a", "1", "L1")] * 4, rollouts(8), "sampled", 0)
    assert sorted(none) == sorted(m) and none["teacher/code/seconds"] == 0.0
    assert none["teacher/code/share"] == 0.0 and none["teacher/code/logq_mean"] != none["teacher/code/logq_mean"]
    assert [t.prompt_ids(p) for p in problems] == [[3], [2], [1], [2]]  # each teacher's rendering


def test_routes_name_known_teachers_and_unsupported_combinations_are_refused():
    with pytest.raises(ConfigError, match="pair.routes.L1='nope' is not allowed: one of b, main"):
        validate(schema_cfg({"pair": {"teachers": {"b": {"path": "toy:x"}}, "routes": {"L1": "nope"}}}))
    with pytest.raises(ConfigError, match="schedule.name='cold_start'"):
        validate(schema_cfg({"pair": {"teachers": {"b": {"path": "toy:x"}}}, "schedule": {"name": "cold_start"}}))


def test_routing_that_would_route_nothing_is_refused(tmp_path, use_tiny_world):
    """Hub or file rows carry no tag unless data.tag_field names their field; a route whose tag no
    prompt has (a number read as text: 5.0 is "5.0") would load its teacher for nothing; a
    teacher named eval would log into the teacher's eval metrics (teacher/eval/…)."""
    from opd_exp.train import train

    two = {"teachers": {"b": {"path": "toy:x"}}, "routes": {"code": "b"}}
    with pytest.raises(ConfigError, match="^data.tag_field=None is not allowed: the rows' field"):
        validate(schema_cfg({"pair": two, "data": {"source": "hub", "name": "org/set"}}))
    validate(schema_cfg({"pair": two, "data": {"source": "hub", "name": "org/set", "tag_field": "domain"}}))
    with pytest.raises(ConfigError, match="^pair.teachers='eval' is not allowed"):
        validate(schema_cfg({"pair": {"teachers": {"eval": {"path": "toy:x"}}}}))
    with pytest.raises(ConfigError, match=r"^pair.routes.L3: no training prompt has the tag 'L3' "
                                          r"\(the pool's tags: 'L1', 'L2'\)"):
        train(compose(TINY_RUN + ["+pair.teachers={self: {path: 'toy:student'}}",
                                  "+pair.routes={L3: self}", "data.levels=[1,2]"]), tmp_path)


ROUTED = ["+pair.teachers={self: {path: 'toy:student'}}", "+pair.routes={L1: self}", "data.levels=[1,2]"]


def test_a_step_scores_each_row_with_its_routed_teacher(tmp_path, use_tiny_world):
    """L1 prompts go to a second teacher — the student's own starting weights — and L2 prompts to
    pair.teacher: at the first step the L1 rows' teacher log-probs are the learner's own."""
    from opd_exp.core.ranks import Dist
    from opd_exp.loop.build import build
    from opd_exp.loop.step import run_step, step_prompts

    run = build(compose(TINY_RUN + ROUTED + ["trainer.steps=1"]), tmp_path, Dist())
    problems = step_prompts(run, 0, False)
    batch, m = run_step(run, 0)
    mask = batch.mask_B_T.bool()
    level_B = [problems[g].tag for g in batch.rollouts.group_B.tolist()]
    for b, level in enumerate(level_B):
        diff = (batch.teacher.logp_B_T[b] - batch.logp_old_B_T[b])[mask[b]].abs().max()
        assert (diff < 1e-4) == (level == "L1"), (b, level, diff)
    assert m["teacher/self/share"] == level_B.count("L1") / len(level_B) == 0.5


def test_a_run_trains_from_two_teachers(tmp_path, use_tiny_world):
    from opd_exp.train import train

    train(compose(TINY_RUN + ROUTED + ["trainer.steps=2", "eval.every=0"]), tmp_path)
    steps = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()][-2:]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["teacher/self/share"] == r["teacher/main/share"] == 0.5
        assert all(r[k] == r[k] for k in ("train/loss", "teacher/self/logq_mean", "teacher/main/logq_mean"))
