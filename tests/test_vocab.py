"""Padded vocabularies (SPEC §1.6): a pair whose models have more embedding rows than tokens, and
rows of different counts (R1-Distill-Qwen-1.5B 151,936 vs -7B 152,064 for one tokenizer). Padded
rows are never tokens: they are never sampled and take part in no objective, support or top-K."""

import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd_exp.config import ConfigError
from opd_exp.core.types import Sampling, StepBatch
from opd_exp.engines.hf_policy import HFPolicy, token_logprobs
from opd_exp.engines.rollout_hf import HFRollout
from opd_exp.engines.teacher_hf import HFTeacher
from opd_exp.methods.full_vocab import FullVocabOPD
from opd_exp.train import train

from .conftest import TINY_RUN, compose

EXTRA = {"student": 5, "teacher": 13}


def _pad(model, extra: int):
    """`extra` more output rows, loud ones: if they took part anywhere, they would dominate."""
    V = model.get_output_embeddings().weight.shape[0]
    model.resize_token_embeddings(V + extra, mean_resizing=False)
    with torch.no_grad():
        W = model.get_output_embeddings().weight
        W[V:] = 10 * W[:V].abs().max() * torch.sign(torch.randn(extra, W.shape[1],
                                                               generator=torch.Generator().manual_seed(extra)))
    return model


@pytest.fixture(scope="module")
def padded_world(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("padded") / "world"
    shutil.copytree(tiny_world, out)
    for name, extra in EXTRA.items():
        _pad(AutoModelForCausalLM.from_pretrained(tiny_world / name), extra).save_pretrained(out / name)
    return out


def _load(world, name):
    return AutoModelForCausalLM.from_pretrained(world / name, dtype=torch.float64)


def test_padded_rows_change_nothing_anywhere(tiny_world, padded_world):
    tok = AutoTokenizer.from_pretrained(tiny_world / "student")
    V = len(tok)
    s, t = _load(tiny_world, "student"), _load(tiny_world, "teacher")
    sp, tp = _load(padded_world, "student"), _load(padded_world, "teacher")
    assert sp.get_output_embeddings().weight.shape[0] == V + 5
    torch.manual_seed(0)
    r = HFRollout(sp, tok, {tok.eos_token_id}).generate([[5, 6, 7], [8, 9]], Sampling(n=8, max_new_tokens=10))
    assert r.response_ids_B_T.max().item() < V  # padded rows are never sampled
    mask = r.response_mask_B_T
    assert ((r.logp_B_T - token_logprobs(s, r)).abs() * mask).max() < 1e-5
    assert torch.allclose(token_logprobs(sp, r, vocab_size=V), token_logprobs(s, r), atol=1e-10)
    # the teacher's top-K: padded rows never enter it, values as without padding
    a = HFTeacher(t, 4, 3).score(r, "topk", 8)
    b = HFTeacher(tp, 4, 3, vocab_size=V).score(r, "topk", 8)
    assert torch.equal(a.topk_idx_B_T_K, b.topk_idx_B_T_K)
    assert torch.allclose(a.topk_logq_B_T_K, b.topk_logq_B_T_K, atol=1e-10)
    # full-vocabulary KL over the real tokens: same loss, same gradient, none on padded rows
    obj = FullVocabOPD(compose([]).objective, None, 1.0)
    n = mask.sum().item()
    grads = []
    for model, teacher, vocab in ((s, t, None), (sp, tp, V)):
        model.zero_grad()
        batch = StepBatch(r, HFTeacher(teacher, 4, 3, vocab_size=vocab).score(r, "hidden"))
        loss, _ = obj.loss(HFPolicy(model, vocab_size=vocab), batch, n)
        loss.backward()
        grads.append((loss.item(), model.get_output_embeddings().weight.grad.clone()))
    assert math.isclose(grads[0][0], grads[1][0], rel_tol=1e-9)
    assert torch.allclose(grads[0][1], grads[1][1][:V], atol=1e-12)
    assert grads[1][1][V:].abs().max() == 0


@pytest.mark.parametrize("objective", ["full_vocab", "topk", "topk_union", "sampled_token"])
def test_train_on_a_pair_with_different_padded_rows(tmp_path, padded_world, monkeypatch, capsys,
                                                    objective):
    monkeypatch.setenv("OPD_EXP_TOY_DIR", str(padded_world))
    extra = ["objective=topk", "objective.support=union"] if objective == "topk_union" else [
        f"objective={objective}"]
    last = train(compose([*TINY_RUN, *extra, "trainer.steps=2", "eval.every=0"]), tmp_path)
    assert math.isfinite(last["train/loss"]) and math.isfinite(last["train/grad_norm"])
    assert "padded rows take part in no objective" in capsys.readouterr().out


def test_topk_larger_than_the_vocabulary_is_refused_at_start(tmp_path, use_tiny_world):
    with pytest.raises(ConfigError, match=r"objective.k=10000000 is not allowed: an integer <= "
                                          r"the vocabulary size \d+"):
        train(compose([*TINY_RUN, "objective=topk", "objective.k=10000000"]), tmp_path)


@pytest.fixture(scope="module")
def swapped_world(tiny_world, tmp_path_factory):
    """The teacher's tokenizer gives the ids of the digit tokens "7" and "8" to each other: a pair
    whose tokenizers differ on two ids (as Qwen2.5 / Qwen3 differ on their added tokens)."""
    import json

    out = tmp_path_factory.mktemp("swapped") / "world"
    shutil.copytree(tiny_world, out)
    path = out / "teacher" / "tokenizer.json"
    spec = json.loads(path.read_text())
    vocab = spec["model"]["vocab"]
    vocab["7"], vocab["8"] = vocab["8"], vocab["7"]
    path.write_text(json.dumps(spec))
    tok = AutoTokenizer.from_pretrained(out / "student")
    return out, sorted(tok.convert_tokens_to_ids(["7", "8"]))


def test_unshared_token_ids_are_an_error_or_never_trained_on(tmp_path, swapped_world, monkeypatch):
    from opd_exp.engines.hf_models import check_same_vocab

    world, ids = swapped_world
    monkeypatch.setenv("OPD_EXP_TOY_DIR", str(world))
    a, b = (AutoTokenizer.from_pretrained(world / n) for n in ("student", "teacher"))
    assert check_same_vocab(a, b, mask_unshared=True) == ids
    with pytest.raises(ConfigError, match="objective.mask_unshared=true"):
        train(compose([*TINY_RUN, "trainer.steps=1", "eval.every=0"]), tmp_path / "refused")
    with pytest.raises(ConfigError, match="^objective.mask_unshared=True is not allowed"):
        train(compose([*TINY_RUN, "objective=full_vocab", "objective.mask_unshared=true"]),
              tmp_path / "full")
    from opd_exp.loop import step

    seen = []
    real = step.StepBatch
    monkeypatch.setattr(step, "StepBatch", lambda r, *a, **k: seen.append(r) or real(r, *a, **k))
    last = train(compose([*TINY_RUN, "trainer.steps=2", "eval.every=0", "rollout.max_new_tokens=24",
                          "objective.mask_unshared=true"]), tmp_path / "masked")
    assert math.isfinite(last["train/loss"])
    hits = 0
    for r in seen:
        sel = torch.isin(r.response_ids_B_T, torch.tensor(ids)) & (r.response_mask_B_T == 0)
        hits += int(sel.sum())
        assert not (torch.isin(r.response_ids_B_T, torch.tensor(ids)) & (r.response_mask_B_T > 0)).any()
    assert hits > 0  # the digits were sampled, and masked


@pytest.mark.slow
def test_vllm_never_samples_padded_rows_and_its_teacher_topk_stays_full(padded_world, tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, "-m", "tests.engines.vllm_padded_probe", str(padded_world),
                        str(tmp_path)], capture_output=True, text=True, cwd=root, timeout=900,
                       env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["rows"] == out["V"] + EXTRA["teacher"]
    assert out["max_sampled"] < out["V"] and out["max_topk_id"] < out["V"] and out["all_finite"]
