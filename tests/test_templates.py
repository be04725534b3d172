"""What the Qwen3 reference pair needs (SPEC §2, §5): per-model chat-template kwargs and system
prompt, the teacher scoring the student's response under its own prompt, and stop tokens from
both models (a Base student ends with <|endoftext|>, its instruct teacher's turn with <|im_end|>)."""

import json
import shutil

import pytest
import torch
from transformers import AutoTokenizer

from opd_exp.engines.hf_models import stop_token_ids
from opd_exp.engines.teacher_hf import HFTeacher
from opd_exp.train import train

from .conftest import TINY_RUN, compose

QWEN3_LIKE = (
    "{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}")


@pytest.fixture(scope="module")
def qwen_like_world(tiny_world, tmp_path_factory):
    """Teacher: a Qwen3-style template with enable_thinking; student: Base-like, its
    generation_config and tokenizer end with <|endoftext|> only."""
    out = tmp_path_factory.mktemp("qwen_like") / "world"
    shutil.copytree(tiny_world, out)
    tcfg = json.loads((out / "teacher/tokenizer_config.json").read_text())
    tcfg["chat_template"] = QWEN3_LIKE
    (out / "teacher/tokenizer_config.json").write_text(json.dumps(tcfg))
    (out / "teacher/chat_template.jinja").unlink(missing_ok=True)
    scfg = json.loads((out / "student/tokenizer_config.json").read_text())
    scfg["eos_token"] = "<|endoftext|>"
    (out / "student/tokenizer_config.json").write_text(json.dumps(scfg))
    gen = json.loads((out / "student/generation_config.json").read_text())
    gen["eos_token_id"] = 0
    (out / "student/generation_config.json").write_text(json.dumps(gen))
    return out


def test_stop_tokens_come_from_both_models(qwen_like_world):
    cfg = compose([]).pair
    s_tok = AutoTokenizer.from_pretrained(qwen_like_world / "student")
    t_tok = AutoTokenizer.from_pretrained(qwen_like_world / "teacher")
    cfg.student.path, cfg.teacher.path = str(qwen_like_world / "student"), str(qwen_like_world / "teacher")
    endoftext, im_end = s_tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    assert stop_token_ids(cfg.student, s_tok) == {endoftext}
    assert stop_token_ids(cfg.teacher, t_tok) == {im_end}


def test_teacher_scores_the_response_under_its_own_prompt(tmp_path, qwen_like_world, monkeypatch):
    monkeypatch.setenv("OPD_EXP_TOY_DIR", str(qwen_like_world))
    seen = []
    real = HFTeacher.score
    monkeypatch.setattr(HFTeacher, "score", lambda self, r, needs, k=0: seen.append(r) or real(self, r, needs, k))
    from opd_exp.loop import step

    trained = []
    real_batch = step.StepBatch
    monkeypatch.setattr(step, "StepBatch", lambda r, *a, **k: trained.append(r) or real_batch(r, *a, **k))
    train(compose([*TINY_RUN, "trainer.steps=1", "eval.every=0", "pair.teacher_prompt=own",
                   "++pair.teacher.chat_template_kwargs.enable_thinking=false",
                   "pair.teacher.system_prompt=Be brief."]), tmp_path)
    tok = AutoTokenizer.from_pretrained(qwen_like_world / "student")
    scored, student = seen[0], trained[0]
    t_prompt = tok.decode(scored.prompt_ids_B_P[0][scored.prompt_mask_B_P[0].bool()])
    s_prompt = tok.decode(student.prompt_ids_B_P[0][student.prompt_mask_B_P[0].bool()])
    assert t_prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert t_prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert s_prompt.startswith("<|im_start|>user\n") and "Be brief." not in s_prompt
    assert s_prompt.endswith("<|im_start|>assistant\n")
    assert torch.equal(scored.response_ids_B_T, student.response_ids_B_T)  # the same response
    # rollouts stopped at either model's end token: <|im_end|> (teacher) or <|endoftext|> (student)
    endoftext, im_end = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    for b in range(student.size):
        n = int(student.response_mask_B_T[b].sum())
        ids = student.response_ids_B_T[b, :n].tolist()
        assert not {endoftext, im_end} & set(ids[:-1])  # nothing generated past a stop token


def test_powerOPD_qwen3_matches_the_authors_scripts():
    c = compose(["+experiment=powerOPD_qwen3"])
    assert c.pair.student.dtype == "float32" and c.pair.teacher.dtype == "bfloat16"
    assert c.pair.teacher.chat_template_kwargs == {"enable_thinking": False}
    assert c.pair.student.chat_template_kwargs == {"enable_thinking": False}
    assert c.objective.special_mask and list(c.objective.mask_strings) == [] and c.objective.mask_stop_token
    assert c.reward.name == "power" and not c.reward.scale_by_alpha
    assert c.learner.warmup_steps == 75 == round(0.05 * c.trainer.steps)
    assert (c.eval.temperature, c.eval.max_new_tokens) == (0.6, 4096)
    assert c.rollout.max_model_len >= 4096
