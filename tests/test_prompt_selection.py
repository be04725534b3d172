"""prompts= (SPEC §2): de-duplication, teacher-aligned selection by score (top fraction, unaligned
share mixed back), the teacher's template, and the scores' cache across resume / overwrite."""

import json
import random

import pytest
import torch
from transformers import AutoTokenizer

from opd_exp.core.types import Problem
from opd_exp.data import PromptSource, make_encoder
from opd_exp.recipes.prompt_selection import select_top, topk_overlap
from opd_exp.runtime.loggers import read_cache
from opd_exp.train import train

from .conftest import TINY_RUN, compose


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 1.0])
def test_selection_keeps_exactly_the_top_fraction(seed, fraction):
    rng = random.Random(seed)
    n = rng.randint(7, 60)
    scores = [rng.choice([0.0, 0.25, 0.5, 0.75, 1.0]) for _ in range(n)]  # many ties
    pool = [Problem(f"p{i}", "1") for i in range(n)]
    kept, m = select_top(pool, scores, fraction)
    n_keep = max(1, round(fraction * n))
    # brute force: a prompt is kept iff fewer than n_keep prompts beat it (ties: pool order)
    beats = lambda i, j: scores[j] > scores[i] or (scores[j] == scores[i] and j < i)  # noqa: E731
    expected = [pool[i] for i in range(n) if sum(beats(i, j) for j in range(n)) < n_keep]
    assert kept == expected and len(kept) == n_keep == m["data/selected"]
    assert min(scores[int(p.prompt[1:])] for p in kept) == m["data/score_threshold"]


def test_ties_follow_the_given_order():
    pool = [Problem(f"p{i}", "1") for i in range(6)]
    kept, _ = select_top(pool, [1, 0, 1, 1, 0, 1], 0.5, tiebreak=[5, 0, 4, 1, 2, 3])
    assert [p.prompt for p in kept] == ["p2", "p3", "p5"]  # of the four 1s, p0 comes last


def test_unaligned_share_comes_from_the_rest_and_is_seeded():
    scores = [i / 100 for i in range(100)]  # prompt i scores i: the top 20 are 80..99
    pool = [Problem(f"p{i}", "1") for i in range(100)]
    kept, m = select_top(pool, scores, 0.2, unaligned_fraction=0.25, seed=3)
    ids = sorted(int(p.prompt[1:]) for p in kept)
    assert len(ids) == 20 and m["data/unaligned"] == 5
    assert ids[-15:] == list(range(85, 100)) and all(i < 80 for i in ids[:5])  # not in the top 20
    assert select_top(pool, scores, 0.2, 0.25, seed=3)[0] == kept
    assert select_top(pool, scores, 0.2, 0.25, seed=4)[0] != kept


def test_exact_and_near_duplicates_are_removed_and_counted():
    texts = ["Compute 3+4.", "Compute 3+4.", "compute 3 + 4", "Compute 3+5.", "COMPUTE 3+5?",
             "What is 3 plus 4?", "What is 34?", "What is 3 4?"]
    src = PromptSource([Problem(t, "7") for t in texts], 2, 0)
    exact = src.dedup("exact")
    assert [p.prompt for p in exact.pool] == [t for i, t in enumerate(texts) if i != 1]
    assert exact.stats()["data/duplicates_exact"] == 1
    near = src.dedup("near")
    assert [p.prompt for p in near.pool] == ["Compute 3+4.", "Compute 3+5.", "What is 3 plus 4?",
                                             "What is 34?", "What is 3 4?"]  # 34 is not 3 4
    assert near.stats()["data/duplicates_exact"] == 1 and near.stats()["data/duplicates_near"] == 2
    assert src.dedup("none").pool == src.pool


def test_topk_overlap_matches_set_intersection():
    g = torch.Generator().manual_seed(0)
    B, T, K, V = 3, 5, 4, 12
    s = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(B * T)]).view(B, T, K)
    t = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(B * T)]).view(B, T, K)
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    mask[0] = 0
    got = topk_overlap(s, t, mask)
    for b in range(B):
        ratios = [len(set(s[b, i].tolist()) & set(t[b, i].tolist())) / K
                  for i in range(T) if mask[b, i]]
        assert got[b].item() == pytest.approx(sum(ratios) / len(ratios) if ratios else 0.0)


def _scores(run_dir):
    rows = [json.loads(x) for x in (run_dir / "prompt_scores.jsonl").read_text().splitlines()]
    assert set(rows[0]) == {"made_under"}  # stamped with the settings that made it
    return rows[1:]


def _step0(run_dir):
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])


@pytest.mark.parametrize("score", ["pass_rate", "overlap"])
def test_a_run_trains_on_the_selected_prompts_and_resumes_with_them(tmp_path, use_tiny_world, score):
    sel = TINY_RUN + ["eval.every=0", "prompts=teacher_aligned", f"prompts.score={score}",
                      "prompts.max_prompts=16", "prompts.keep_fraction=0.25", "prompts.k=8",
                      "prompts.samples=2", "trainer.save_every=1", "data.prompts_per_step=2"]
    train(compose(sel + ["trainer.steps=1"]), tmp_path)
    rows = _scores(tmp_path)
    assert len(rows) == 16 and all(0 <= r["score"] <= 1 for r in rows)
    m = _step0(tmp_path)
    assert m["data/prompts"] == m["data/selected"] == 4 and m["data/scored"] == 16
    if score == "pass_rate":
        assert all(r["score"] * 2 == int(r["score"] * 2) for r in rows)  # k / samples
    best = sorted(range(16), key=lambda i: (-rows[i]["score"], i))[:4]
    assert m["data/score_threshold"] == rows[best[-1]]["score"]
    # a resumed run reads the cached scores (its moved student would score differently)
    before = (tmp_path / "prompt_scores.jsonl").read_text()
    train(compose(sel + ["trainer.steps=2", "trainer.resume=true"]), tmp_path)
    assert (tmp_path / "prompt_scores.jsonl").read_text() == before
    # trainer.overwrite starts over: the scores are made again, not read from the old run
    (tmp_path / "prompt_scores.jsonl").write_text(before.splitlines()[0] + "\n" + "".join(
        json.dumps({**r, "score": 7.0}) + "\n" for r in rows))
    train(compose(sel + ["trainer.steps=1", "trainer.overwrite=true"]), tmp_path)
    assert all(r["score"] <= 1 for r in _scores(tmp_path)) and len(_scores(tmp_path)) == 16


def test_a_cache_made_under_other_settings_is_started_over(tmp_path):
    path = tmp_path / "c.jsonl"
    assert read_cache(path, {"teacher": "a", "k": (1, 2)}) == []
    with open(path, "a") as f:
        f.write(json.dumps({"prompt": "x", "score": 0.5}) + "\n")
    assert read_cache(path, {"teacher": "a", "k": (1, 2)}) == [{"prompt": "x", "score": 0.5}]
    assert read_cache(path, {"teacher": "b", "k": (1, 2)}) == []  # another teacher: not read
    assert read_cache(path, {"teacher": "a", "k": (1, 2)}) == []  # … and it was started over
    with open(path, "a") as f:  # a record, then one torn by a kill
        f.write(json.dumps({"prompt": "y", "score": 1.0}) + "\n" + '{"prompt": "z", "sc')
    assert read_cache(path, {"teacher": "a", "k": (1, 2)}) == [{"prompt": "y", "score": 1.0}]
    with open(path, "a") as f:  # the next append starts on a line of its own
        f.write(json.dumps({"prompt": "w", "score": 0.0}) + "\n")
    assert len(read_cache(path, {"teacher": "a", "k": (1, 2)})) == 2


def test_teacher_template_renders_the_students_prompts(use_tiny_world):
    tok = AutoTokenizer.from_pretrained(use_tiny_world / "student")
    teacher_tok = AutoTokenizer.from_pretrained(use_tiny_world / "teacher")
    teacher_tok.chat_template = ("{%- for m in messages %}{{- 'T:' + m['content'] + '\\n' }}"
                                 "{%- endfor %}{{- '<|im_start|>assistant\\n' }}")
    cfg = compose(["prompts.template=teacher"]).pair.teacher
    ids = make_encoder(tok, True, "", cfg, teacher_tok)("Compute 1+2.")
    assert tok.decode(ids) == "T:Compute 1+2.\n<|im_start|>assistant\n"
    assert ids == tok("T:Compute 1+2.\n<|im_start|>assistant\n", add_special_tokens=False).input_ids
