"""teacher.cache_dir: teacher scores stored by content — a sequence scored again is read back
with identical numbers, and any change of tokens, mask, request or teacher is another key."""

import torch

from opd_exp.core.types import Rollouts, TeacherScores
from opd_exp.runtime.score_cache import CachedTeacher

K = 3


class Counting:
    """A teacher whose scores are a function of the tokens; it counts the rows it is asked."""

    def __init__(self):
        self.rows = 0

    def score(self, r: Rollouts, needs: str, k: int = 0) -> TeacherScores:
        self.rows += r.response_ids_B_T.shape[0]
        ids = r.response_ids_B_T.float()
        logp = -ids / 100 - r.prompt_ids_B_P.float().sum(-1, keepdim=True) / 1000
        return TeacherScores(logp_B_T=logp, topk_logq_B_T_K=logp[..., None].repeat(1, 1, k),
                             topk_idx_B_T_K=r.response_ids_B_T[..., None].repeat(1, 1, k))


def rollouts(seed: int = 0) -> Rollouts:
    g = torch.Generator().manual_seed(seed)
    B, P, T = 5, 4, 6
    rm = torch.ones(B, T)
    rm[1, 4:] = 0
    rm[2, 2] = 0  # a hole: part of the key
    return Rollouts(prompt_ids_B_P=torch.randint(1, 50, (B, P), generator=g), prompt_mask_B_P=torch.ones(B, P),
                    response_ids_B_T=torch.randint(1, 50, (B, T), generator=g), response_mask_B_T=rm,
                    group_B=torch.arange(B))


def test_a_sequence_scored_again_is_read_back_identically(tmp_path):
    teacher, r = Counting(), rollouts()
    first = CachedTeacher(teacher, tmp_path, {"path": "t"})
    a = first.score(r, "topk", K)
    again = CachedTeacher(teacher, tmp_path, {"path": "t"})  # another run of the sweep
    b = again.score(r, "topk", K)
    assert (first.misses, again.hits, again.misses, teacher.rows) == (5, 5, 0, 5)
    m = r.response_mask_B_T.bool()
    for name in ("topk_logq_B_T_K", "topk_idx_B_T_K"):
        assert torch.equal(getattr(a, name)[m], getattr(b, name)[m])
    direct = Counting().score(r, "topk", K)
    assert torch.equal(b.topk_logq_B_T_K[m], direct.topk_logq_B_T_K[m])


def test_any_change_of_tokens_mask_request_or_teacher_is_a_miss(tmp_path):
    teacher, r = Counting(), rollouts()
    CachedTeacher(teacher, tmp_path, {"path": "t"}).score(r, "sampled")
    changed = rollouts()
    changed.response_ids_B_T[0, 1] += 1  # one token of row 0
    changed.response_mask_B_T[3, 0] = 0  # the mask of row 3
    c = CachedTeacher(teacher, tmp_path, {"path": "t"})
    out = c.score(changed, "sampled")
    assert (c.hits, c.misses) == (3, 2)
    assert out.logp_B_T[0, 1] == -changed.response_ids_B_T[0, 1].float() / 100 - changed.prompt_ids_B_P[0].float().sum() / 1000
    for identity, needs, k in (({"path": "other"}, "sampled", 0), ({"path": "t"}, "topk", K)):
        c = CachedTeacher(teacher, tmp_path, identity)
        c.score(r, needs, k)
        assert (c.hits, c.misses) == (0, 5)


def test_scores_with_hidden_states_pass_through(tmp_path):
    class Hidden:
        def score(self, r, needs, k=0):
            return TeacherScores(hidden_B_T_H=torch.ones(5, 6, 2))

    c = CachedTeacher(Hidden(), tmp_path, {"path": "t"})
    assert c.score(rollouts(), "hidden").hidden_B_T_H.shape == (5, 6, 2)
    assert (c.hits, c.misses) == (0, 0) and not any(tmp_path.iterdir())


def test_two_runs_of_a_sweep_share_the_teachers_prompt_selection_scores(tmp_path, use_tiny_world):
    import json

    from opd_exp.train import train

    from .conftest import TINY_RUN, compose

    stats = []
    for alpha in (0.5, 2.0):  # two runs of an α sweep: same student, seed and prompts
        cfg = compose(TINY_RUN + ["prompts=teacher_aligned", "prompts.score=overlap", "trainer.steps=1",
                                  "eval.every=0", "reward=power", f"reward.alpha={alpha}",
                                  f"teacher.cache_dir={tmp_path / 'cache'}"])
        train(cfg, tmp_path / str(alpha))
        first = json.loads((tmp_path / str(alpha) / "metrics.jsonl").read_text().splitlines()[0])
        stats.append({k: v for k, v in first.items() if k.startswith("data/")})
    assert stats[0]["data/teacher_cache_misses"] > 0 and stats[0]["data/teacher_cache_hits"] == 0
    assert stats[1]["data/teacher_cache_hits"] == stats[0]["data/teacher_cache_misses"]
    assert stats[1]["data/teacher_cache_misses"] == 0
    assert stats[1]["data/score_mean_selected"] == stats[0]["data/score_mean_selected"]


def test_a_hub_teacher_is_known_by_its_cached_commit_and_the_vocabulary(tmp_path, monkeypatch):
    """A hub id with no revision names whatever is newest: its identity is the commit the local
    HF cache resolves it to, so an updated model is another key; the student's vocabulary size
    and the teacher's rows (which ids a top-K leaves out) are part of it too."""
    from huggingface_hub import constants

    from opd_exp.config import schema_cfg
    from opd_exp.runtime.score_cache import teacher_identity

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--org--teacher"

    def cached(commit: str) -> None:
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)

    m = schema_cfg({"pair": {"teacher": {"path": "org/teacher"}}}).pair.teacher
    cached("a" * 40)
    old = teacher_identity(m, "hf", "org/teacher", 100, 128)
    assert old["commit"] == "a" * 40
    cached("b" * 40)  # the hub model was updated, and downloaded again
    assert teacher_identity(m, "hf", "org/teacher", 100, 128)["commit"] == "b" * 40
    assert teacher_identity(m, "hf", "org/teacher", 100, 136) != teacher_identity(m, "hf", "org/teacher", 100, 128)
    assert teacher_identity(m, "hf", "org/gone", 100, 128)["commit"] is None  # not in the cache
