"""Prompt data from hub rows or a local file: bad rows and prompts too long for the context are
skipped and counted (data/skipped_rows, data/skipped_too_long), never a crash mid-run."""

import json

import pytest

from opd_exp.config import ConfigError
from opd_exp.data import problems_from_rows
from opd_exp.train import train

from .conftest import TINY_RUN, compose


def test_rows_without_prompt_or_answer_are_skipped_and_counted():
    rows = [{"problem": "1+1?", "answer": "2"}, {"problem": "no answer"}, {"answer": "3"},
            {"problem": "  ", "answer": "4"}, {"problem": "list", "answer": ["5", "6"]},
            {"problem": "empty list", "answer": []}, None, {"problem": "zero", "answer": 0}]
    problems, skipped = problems_from_rows(rows, "problem", "answer")
    assert [(p.prompt, p.answer) for p in problems] == [("1+1?", "2"), ("list", "5"), ("zero", "0")]
    assert skipped == 5


def test_train_from_a_jsonl_file_skips_bad_rows_and_too_long_prompts(tmp_path, use_tiny_world):
    good = [{"q": f"Compute {a}+{b}.", "a": str(a + b)} for a, b in ((1, 2), (3, 4), (5, 6))]
    lines = [json.dumps(r) for r in good] + [
        json.dumps({"q": "no answer"}), "{not json", json.dumps({"q": "", "a": "1"}),
        json.dumps({"q": "Compute 1+1. " * 200, "a": "2"})]  # longer than the toy context
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    train(compose([*TINY_RUN, "data.source=file", f"data.path={path}", "data.prompt_field=q",
                   "data.answer_field=a", "trainer.steps=1", "eval.every=0"]), run)
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first == {"step": 0, "data/prompts": 3, "data/skipped_rows": 3,
                     "data/duplicates_exact": 0, "data/skipped_too_long": 1}


def test_file_source_needs_an_existing_file(tmp_path):
    with pytest.raises(ConfigError, match="^data.path=.* is not allowed: an existing .jsonl"):
        train(compose([*TINY_RUN, "data.source=file", f"data.path={tmp_path}/none.jsonl"]), tmp_path)


def test_prompts_too_long_for_the_teacher_rendering_are_skipped(tmp_path, use_tiny_world):
    """pair.teacher_prompt=own: the teacher's prompt (here a long system message) must fit too."""
    base = [*TINY_RUN, "trainer.steps=1", "eval.every=0", "rollout.max_model_len=64",
            "pair.teacher_prompt=own"]
    train(compose(base), tmp_path / "fits")
    with pytest.raises(ConfigError, match="^data: no usable prompt is left"):
        train(compose(base + ["pair.teacher.system_prompt=" + "Be brief. " * 20]), tmp_path / "long")
