"""Toy models on the real Qwen vocabularies (opd_exp/toyworld/qwen_models.py): the reduced
vocabulary covers the task, the lifted small model's loss is the real-size model's cross-entropy,
the lifted model loads like a hub Qwen3 with the real tokenizer, its softmax is the small model's,
and the manifest's mass outside the task is the saved model's."""

import json
import math
import random
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd_exp import toyworld
from opd_exp.toyworld import qwen_models, qwen_vocab, task
from opd_exp.toyworld.build import _batch, benchmark_problems
from opd_exp.toyworld.qwen_models import SmallVocab, lifted_dir, render


def _docs(tok, n=6, seed=3):
    rng = random.Random(seed)
    return [render(tok, task.make_problem(rng, task.LEVELS[i % 6])) for i in range(n)]


def test_the_reduced_vocabulary_covers_the_task_and_every_special_token(tiny_world):
    _, small = SmallVocab.load(tiny_world / "qwen3_student")
    tok = qwen_vocab.load("qwen3")
    assert small.real_ids[-1] == -1 and small.rows == 151936
    assert set(range(151643, 151669)) <= set(small.real_ids)  # <think> 151667, </think> 151668
    # the held-out benchmarks' documents (left out of the corpus) map to task tokens only
    bench = [p for ps in benchmark_problems(0).values() for p in ps]
    for prompt, response in (render(tok, p) for p in bench):
        for text in (prompt, response, prompt + response):
            assert small.other not in small.to_small(tok(text, add_special_tokens=False).input_ids)
    assert small.to_small([576, 151667]) == [small.other, small.real_ids.index(151667)]


def test_qwen36_responses_continue_the_think_block_its_template_opens(qwen_tokenizer):
    p = task.make_problem(random.Random(0), 2)
    prompt, response = render(qwen_tokenizer("qwen36"), p)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    assert response == f"{p.thought}</think> \\boxed{{{p.answer}}}<|im_end|>"
    prompt, response = render(qwen_tokenizer("qwen3"), p)
    assert prompt.endswith("<|im_start|>assistant\n") and response.startswith("<think>")


def test_the_lifted_small_loss_is_the_real_size_models_cross_entropy(tiny_world):
    """SmallVocab.loss (small logits, + log N_other on `other`: the loss a family trained lifted
    minimises) equals the real-size model's next-token cross-entropy over all 151,936 rows,
    brute force."""
    small_dir = tiny_world / "qwen3_teacher"
    _, small = SmallVocab.load(small_dir)
    tok = qwen_vocab.load("qwen3")
    model = AutoModelForCausalLM.from_pretrained(small_dir, dtype=torch.float64)
    big = AutoModelForCausalLM.from_pretrained(lifted_dir(small_dir), dtype=torch.float64)
    docs = _docs(tok)
    b_small = _batch(tok, docs, small.to_small)
    b_real = _batch(tok, docs)
    with torch.no_grad():
        loss = small.loss(model, b_small)
        z = big(input_ids=b_real["input_ids"], attention_mask=b_real["attention_mask"]).logits
        real = torch.nn.functional.cross_entropy(z[:, :-1].flatten(0, 1),
                                                 b_real["labels"][:, 1:].flatten(), ignore_index=-100)
        p_small = small.logits(model, b_small["input_ids"], b_small["attention_mask"]).softmax(-1)
        p_real = z.softmax(-1)
    assert abs(loss.item() - real.item()) <= 1e-9
    task_ids = list(small.real_ids[:-1])
    assert torch.allclose(p_real[..., task_ids], p_small[..., :-1], atol=1e-12)
    outside = p_real.sum(-1) - p_real[..., task_ids].sum(-1)
    assert torch.allclose(outside, p_small[..., -1], atol=1e-12)


def test_a_lifted_model_loads_like_a_hub_qwen3_with_the_real_tokenizer(use_tiny_world):
    folder = toyworld.model_dir("qwen3_student")
    assert folder.parent == qwen_vocab.cache_root() / "models"
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.config.model_type == "qwen3" and model.config.vocab_size == 151936
    assert model.get_input_embeddings().weight.shape == (151936, 64)
    assert len(tok) == 151669 and tok.eos_token == "<|im_end|>"
    assert model.config.eos_token_id == model.generation_config.eos_token_id == 151645
    assert model.config.pad_token_id == 151643
    assert tok("<|im_start|>assistant\n").input_ids == [151644, 77091, 198]
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert toyworld.model_dir("qwen3_student") == folder  # lifted once, then reused
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_changed_small_model_is_lifted_anew(tiny_world, tmp_path):
    import shutil

    copy = tmp_path / "qwen3_student"
    shutil.copytree(tiny_world / "qwen3_student", copy)
    first = lifted_dir(copy)
    m = AutoModelForCausalLM.from_pretrained(copy)
    with torch.no_grad():
        m.model.norm.weight.add_(1.0)
    m.save_pretrained(copy)
    second = lifted_dir(copy)
    assert second != first and torch.allclose(
        AutoModelForCausalLM.from_pretrained(second).model.norm.weight, m.model.norm.weight)


def test_the_manifest_states_the_mass_outside_the_tasks_tokens(tiny_world):
    entry = json.loads((tiny_world / "manifest.json").read_text())["models"]["qwen3_student"]
    assert entry["vocab"] == "qwen3" and entry["rows"] == 151936 and entry["task_tokens"] == 191
    assert 0 <= entry["other_mass_mean"] <= entry["other_mass_max"] <= 1
    assert entry["lifted_training"] is qwen_models.LIFTED_TRAINING["qwen3"] is False  # as built
    teacher36 = json.loads((tiny_world / "manifest.json").read_text())["models"]["qwen36_teacher"]
    assert teacher36["lifted_training"] is True


@pytest.mark.parametrize("name", ["qwen3_student", "qwen36_teacher"])  # trained plain / lifted
def test_the_manifests_mass_outside_the_task_is_the_saved_models_at_the_lifted_logit(tiny_world, name):
    """Recomputed from the saved folder (its real_ids.json: the lifted vocabulary) on the
    benchmarks' answers: a family trained plain must be measured, and fitted, at + log N_other,
    not at the offset it trained with (0: the mass would be understated by a factor ≈ N_other)."""
    entry = json.loads((tiny_world / "manifest.json").read_text())["models"][name]
    vocab, small = SmallVocab.load(tiny_world / name)
    assert small.lifted and small.offset > 11
    model = AutoModelForCausalLM.from_pretrained(tiny_world / name).eval()
    bench = [p for ps in benchmark_problems(0).values() for p in ps]
    got = qwen_models.other_mass(model, small, qwen_vocab.load(vocab), bench)
    assert got["other_mass_max"] == pytest.approx(entry["other_mass_max"], rel=1e-4)
    assert got["other_mass_mean"] == pytest.approx(entry["other_mass_mean"], rel=1e-4)


def test_a_family_trained_unlifted_has_no_offset_until_the_row_is_fitted():
    small = SmallVocab((5, 9, -1), rows=100)
    assert small.offset == pytest.approx(math.log(98)) and replace(small, lifted=False).offset == 0.0


@pytest.mark.skipif(not toyworld.is_built(toyworld.SHIPPED_DIR), reason="no shipped toy world")
@pytest.mark.parametrize("name", qwen_models.NAMES)
def test_the_shipped_models_put_almost_nothing_outside_the_tasks_tokens(name):
    """Measured at build time on the held-out benchmarks' reference answers (every response
    position of 384 documents): the largest mass on the other 151,7xx / 248,1xx rows."""
    entry = toyworld.manifest(toyworld.SHIPPED_DIR)["models"][name]
    assert entry["other_mass_max"] < 1e-6, entry
