"""The toy world: task invariants, tokenizer, deterministic build, hub-style loading."""

import json
import random
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd_exp import toyworld
from opd_exp.evaluation import is_correct
from opd_exp.toyworld import task
from omegaconf import OmegaConf

from opd_exp.config import ConfigError
from opd_exp.engines.hf_models import load_model, load_tokenizer, stop_token_ids
from opd_exp.toyworld.build import BENCHMARK_SIZE, VARIANTS, add_variants, build_world
from opd_exp.toyworld.qwen_models import add_families
from opd_exp.toyworld.tokenizer import IM_END, IM_START, PAD

from .conftest import TINY_FAMILIES, TINY_TEACHER


@pytest.mark.parametrize("seed", range(5))
def test_problems_are_consistent(seed):
    rng = random.Random(seed)
    for level in task.LEVELS:
        for family in task.FAMILIES:
            p = task.make_problem(rng, level, family)
            steps = re.findall(r"(\d+)([+-])(\d+)=(\d+)\.", p.thought)
            assert len(steps) == level
            value = int(steps[0][0])
            for a, op, b, c in steps:
                assert int(a) == value
                value = int(a) + int(b) if op == "+" else int(a) - int(b)
                assert int(c) == value and 0 <= value <= task.MAX_VALUE
            assert p.answer == str(value) and is_correct(p.response, p.answer)
            # every operand the thought uses is stated in the prompt
            assert all(b in re.findall(r"\d+", p.prompt) for _, _, b, _ in steps)


def test_benchmarks_fixed_and_disjoint_from_each_other(tiny_world):
    prompts = set()
    for lv in task.LEVELS:
        rows = [json.loads(x) for x in (tiny_world / "benchmarks" / f"toy_L{lv}.jsonl").read_text().splitlines()]
        assert len(rows) == BENCHMARK_SIZE and all(r["level"] == lv for r in rows)
        prompts |= {r["prompt"] for r in rows}
    assert len(prompts) == 6 * BENCHMARK_SIZE


def test_tokenizer_roundtrip_and_chat_template(tiny_world):
    tok = AutoTokenizer.from_pretrained(tiny_world / "student")
    assert 300 <= len(tok) <= 1024 and tok.padding_side == "left"
    p = task.make_problem(random.Random(3), 4, "words")
    text = tok.apply_chat_template([{"role": "user", "content": p.prompt}],
                                   add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
    full = text + p.response + tok.eos_token
    ids = tok(full, add_special_tokens=False).input_ids
    assert tok.decode(ids) == full
    digits = [tok.decode([i]) for i in tok(p.prompt).input_ids if tok.decode([i]).strip().isdigit()]
    assert all(len(d.strip()) == 1 for d in digits)  # one digit per token
    assert tok.decode(tok("any text: é ∑ 12").input_ids) == "any text: é ∑ 12"  # byte level


def test_models_load_like_hub_models(tiny_world):
    for name in toyworld.PAIR + toyworld.VARIANT_NAMES:  # the real-vocabulary ones: test_qwen_models.py
        model = AutoModelForCausalLM.from_pretrained(tiny_world / name)
        assert model.config.model_type == "qwen3" and model.config.head_dim >= 32
        assert model.generation_config.eos_token_id == AutoTokenizer.from_pretrained(
            tiny_world / name).eos_token_id


def test_build_is_deterministic(tiny_world, tmp_path):
    again = build_world(tmp_path / "again", seed=0, teacher=TINY_TEACHER, student_step=2,
                        progress=False, log=lambda *a: None)
    add_families(again, TINY_FAMILIES, progress=False, log=lambda *a: None)
    assert set(toyworld.manifest(again)["models"]) == set(toyworld.manifest(tiny_world)["models"])
    for name in toyworld.manifest(again)["models"]:
        a = AutoModelForCausalLM.from_pretrained(tiny_world / name).state_dict()
        b = AutoModelForCausalLM.from_pretrained(again / name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tiny_world / "student/tokenizer.json").read_text() == (again / "student/tokenizer.json").read_text()
    assert (tiny_world / "qwen3_student/real_ids.json").read_text() == (again / "qwen3_student/real_ids.json").read_text()
    for f in (tiny_world / "benchmarks").iterdir():
        assert f.read_text() == (again / "benchmarks" / f.name).read_text()


def test_world_dir_prefers_env_and_builds_on_first_use(tmp_path, monkeypatch, tiny_world):
    monkeypatch.setenv(toyworld.ENV_VAR, str(tiny_world))
    assert toyworld.world_dir() == tiny_world
    monkeypatch.setenv(toyworld.ENV_VAR, str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError):
        toyworld.world_dir(build_if_missing=False)


def test_shipped_world_is_complete_and_small():
    d = toyworld.SHIPPED_DIR
    if not toyworld.is_built(d):
        pytest.skip("no shipped toy world in this checkout")
    size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    assert size <= 40 * 2**20  # ten models of 2.6 MB and the five small real-vocabulary ones of 2.4 MB
    m = toyworld.manifest(d)
    assert set(m["models"]) == set(toyworld.MODEL_NAMES) and 300 <= m["vocab_size"] <= 1024
    for name in toyworld.MODEL_NAMES:
        assert AutoModelForCausalLM.from_pretrained(d / name).config.head_dim >= 32


def test_variant_names_are_the_built_ones():
    from opd_exp.toyworld import qwen_models

    assert tuple(v.name for v in VARIANTS) == toyworld.VARIANT_NAMES
    assert qwen_models.NAMES == toyworld.REAL_VOCAB_NAMES


# the stop token each model states (generation_config, config and tokenizer), like its hub kin:
# a Base model ends with <|endoftext|>, chat models end their turn with <|im_end|>
STOPS = {"teacher": IM_END, "student": IM_END, "teacher_foreign": IM_END,
         "teacher_same_data": IM_END, "base_student": PAD, "teacher_short": IM_END,
         "teacher_long": IM_END, "teacher_readable": IM_END, "base_student_near": PAD,
         "teacher_seen_base": IM_END, **{n: IM_END for n in toyworld.REAL_VOCAB_NAMES}}


@pytest.mark.parametrize("shipped", [False, True])
def test_every_toy_model_loads_through_the_hub_path_with_its_stop_token(shipped, tiny_world, monkeypatch):
    if shipped:
        if not toyworld.is_built(toyworld.SHIPPED_DIR):
            pytest.skip("no shipped toy world in this checkout")
        monkeypatch.delenv(toyworld.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(toyworld.ENV_VAR, str(tiny_world))
    assert set(STOPS) == set(toyworld.MODEL_NAMES)
    built = toyworld.manifest()["models"]  # the tiny world has one real-vocabulary family
    for name, stop in STOPS.items():
        if name not in built:
            continue
        mcfg = OmegaConf.create({"path": f"toy:{name}", "dtype": "float32", "revision": None,
                                 "trust_remote_code": False})
        tok = load_tokenizer(mcfg, "pair.student")
        model = load_model(mcfg, "pair.student")
        stop_id = tok.convert_tokens_to_ids(stop)
        assert stop_token_ids(mcfg, tok) == {stop_id}, name
        assert model.config.eos_token_id == model.generation_config.eos_token_id == stop_id
        assert tok.eos_token == stop and tok.pad_token == PAD
        if name in toyworld.REAL_VOCAB_NAMES:  # the real Qwen tokenizers' (test_qwen_vocab.py)
            assert len(tok) in (151665, 151669, 248077) and IM_START in tok.all_special_tokens
        else:
            assert set(tok.all_special_tokens) == {PAD, IM_START, IM_END, "<think>", "</think>"}


def test_a_world_built_before_a_variant_names_the_command_that_adds_it(tiny_world, tmp_path, monkeypatch):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_world, old)
    shutil.rmtree(old / "base_student")
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["models"]["base_student"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv(toyworld.ENV_VAR, str(old))
    with pytest.raises(ConfigError, match="toy build --out .* --only base_student"):
        toyworld.model_dir("base_student")
    add_variants(old, ["base_student"], progress=False, log=lambda *a: None)
    a = AutoModelForCausalLM.from_pretrained(tiny_world / "base_student").state_dict()
    b = AutoModelForCausalLM.from_pretrained(old / "base_student").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same model as a whole build makes
    assert set(toyworld.manifest(old)["models"]) == set(toyworld.manifest(tiny_world)["models"])


def test_styles_write_their_own_pattern_with_the_same_answer():
    p = task.make_problem(random.Random(5), 3, "expr")
    foreign, base = p.render("foreign"), p.render("base")
    assert p.render("chat") == p.response
    assert foreign.startswith("<think>start ") and foreign.endswith(f"\\boxed{{{p.answer}}}")
    assert "<think>" not in base and base.endswith(f"The answer is \\boxed{{{p.answer}}}.")
    for text in (foreign, base):
        assert is_correct(text, p.answer)
    # the steps: the same operands and running values, written another way
    assert re.findall(r"\d+", foreign)[:-1] == re.findall(r"\d+", p.thought)[::3][:1] + [
        x for a, b, c in re.findall(r"(\d+)[+-](\d+)=(\d+)", p.thought) for x in (b, c)]


@pytest.mark.parametrize("level", task.LEVELS)
def test_readable_styles_keep_the_chat_equations_and_differ_around_them(level):
    p = task.make_problem(random.Random(level), level)
    readable, near = p.render("readable"), p.render("base_near")
    equations = re.findall(r"\d+[+-]\d+=\d+\.", p.thought)
    # the student's equations, in order, each one readable as the chat style writes it
    assert re.findall(r"\d+[+-]\d+=\d+\.", readable)[:-1] == equations
    assert near == f"{p.thought} The answer is \\boxed{{{p.answer}}}."
    assert readable.startswith(f"<think>Start at {p.start}. First {equations[0]}")
    # the verification step undoes the last operation and lands on the previous value
    a, op, n, new = re.search(r"Check (\d+)([+-])(\d+)=(\d+)\.", readable).groups()
    assert int(a) == int(p.answer) and (int(a) + int(n) if op == "+" else int(a) - int(n)) == int(new)
    assert int(new) == int(re.findall(r"(\d+)[+-]\d+=\d+\.", p.thought)[-1])
    for text in (readable, near):
        assert is_correct(text, p.answer)


def test_a_mixed_variant_writes_its_share_in_the_other_style(tiny_world):
    from opd_exp.toyworld.build import renderer

    tok = AutoTokenizer.from_pretrained(tiny_world / "teacher")
    render = renderer("chat", tok, 0, mix=("base_near", 0.2))
    docs = [render(task.make_problem(random.Random(i), 2)) for i in range(2000)]
    other = [d for d in docs if d[1].endswith(tok.pad_token)]
    assert 0.17 < len(other) / len(docs) < 0.23
    assert all("<think>" not in r and "The answer is" in r for _, r in other)
    assert all(r.endswith(tok.eos_token) and r.startswith("<think>") for _, r in docs
               if not r.endswith(tok.pad_token))
    again = renderer("chat", tok, 0, mix=("base_near", 0.2))  # seeded: the same documents
    assert docs == [again(task.make_problem(random.Random(i), 2)) for i in range(2000)]
