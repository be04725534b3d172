"""Special-token masking (SPEC §1.6) on both kinds of tokenizer: one that writes `<think>` as one
token (Qwen3, the toy world) and one that splits it into pieces (the LSM authors' tokenizer)."""

import random

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from opd_exp import toyworld
from opd_exp.config import schema_cfg
from opd_exp.core.types import Rollouts, response_mask
from opd_exp.methods.masking import SpecialTokenMask
from opd_exp.toyworld import task
from opd_exp.toyworld.tokenizer import IM_END, IM_START, PAD, train_tokenizer

DEFAULT = schema_cfg().objective.mask_strings


@pytest.fixture(scope="module")
def one_token_tok():
    return AutoTokenizer.from_pretrained(toyworld.model_dir("student"))


@pytest.fixture(scope="module")
def split_tok():
    """A BPE tokenizer of the same task with no special <think> / </think>: it spells them."""
    corpus = [f"{p.prompt} {p.response}" for p in task.sample_problems(0, (1, 2, 3), 400)]
    return train_tokenizer(corpus, vocab_size=400, special_tokens=[PAD, IM_START, IM_END])


def _masker(tok, strings=None, stop=True):
    o = OmegaConf.create({"special_mask": True, "mask_strings": list(strings or DEFAULT),
                          "mask_stop_token": stop})
    return SpecialTokenMask.from_cfg(o, tok, {tok.convert_tokens_to_ids(IM_END)})


def _rollouts(tok, texts):
    rows = [tok(t, add_special_tokens=False).input_ids for t in texts]
    T = max(map(len, rows))
    pad = tok.convert_tokens_to_ids(PAD)
    ids = torch.tensor([r + [pad] * (T - len(r)) for r in rows])
    stop = tok.convert_tokens_to_ids(IM_END)
    m = response_mask(ids, {stop}) * (torch.arange(T)[None] < torch.tensor([len(r) for r in rows])[:, None])
    one = torch.ones(len(rows), 1, dtype=torch.long)
    return Rollouts(one, one, ids, m, torch.arange(len(rows)))


def _expected(tok, text, strings):
    """Independent reference: the tokenizer's own character offsets of each token."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    masked = set()
    for s in strings:
        pos = text.find(s)
        if pos >= 0:
            masked |= {i for i, (a, b) in enumerate(enc.offset_mapping) if a < pos + len(s) and b > pos}
    return masked


TEXT = "<think>3+4=7. 7+1=8.</think> <think>again</think> \\boxed{8}<|im_end|>"


def test_defaults_mask_the_thinking_tags_and_end_of_turn_written_as_one_token(one_token_tok):
    tok = one_token_tok
    assert len(tok("<think>", add_special_tokens=False).input_ids) == 1
    r = _rollouts(tok, [TEXT])
    out, m = _masker(tok, stop=False)(r)
    ids = r.response_ids_B_T[0].tolist()
    masked = [i for i, v in enumerate(out.response_mask_B_T[0].tolist()) if v == 0]
    think, end_think = tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>")
    assert masked == [ids.index(think), ids.index(end_think), len(ids) - 1]  # first ones only
    assert m == {"masked_tokens": 3.0}


def test_a_split_tag_masks_the_pieces_of_its_first_occurrence(split_tok):
    tok = split_tok
    pieces = tok("<think>", add_special_tokens=False).input_ids
    assert len(pieces) > 1  # the fixture really splits the tag
    r = _rollouts(tok, [TEXT])
    out, m = _masker(tok, stop=False)(r)
    masked = {i for i, v in enumerate(out.response_mask_B_T[0].tolist()) if v == 0}
    assert masked == _expected(tok, TEXT, DEFAULT)
    assert list(sorted(masked))[:len(pieces)] == list(range(len(pieces)))  # "<think>" opens it
    assert m["masked_tokens"] == len(masked)


@pytest.fixture(scope="module")
def qwen3_tok(qwen_tokenizer):
    return qwen_tokenizer("qwen3")


@pytest.fixture(scope="module")
def qwen25_tok(qwen_tokenizer):
    return qwen_tokenizer("qwen25")


@pytest.mark.parametrize("which", ["one_token_tok", "split_tok", "qwen3_tok",
                                   pytest.param("qwen25_tok", marks=pytest.mark.slow)])
def test_matches_the_tokenizers_own_offsets_on_random_responses(request, which):
    tok = request.getfixturevalue(which)
    rng = random.Random(0)
    words = ["<think>", "</think>", "<", "think", ">", "3+4=7.", " ", "\\boxed{", "}", "x",
             "<|im_end|>", "th", "ink"]
    strings = DEFAULT + ["think", "+4"]
    texts = ["".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(200)]
    r = _rollouts(tok, texts)
    out, _ = _masker(tok, strings, stop=False)(r)
    for b, text in enumerate(texts):
        n = int(r.response_mask_B_T[b].sum())  # up to the first <|im_end|>
        prefix = tok.decode(r.response_ids_B_T[b, :n])
        assert tok(prefix, add_special_tokens=False).input_ids == r.response_ids_B_T[b, :n].tolist()
        got = {i for i in range(n) if out.response_mask_B_T[b, i] == 0}
        assert got == _expected(tok, prefix, strings), (text, prefix)


def test_stop_token_masked_and_disabled_changes_nothing(one_token_tok):
    tok = one_token_tok
    r = _rollouts(tok, ["7+1=8. \\boxed{8}<|im_end|>"])
    out, m = _masker(tok, strings=["nothing-here"], stop=True)(r)
    assert out.response_mask_B_T[0, -1] == 0 and m == {"masked_tokens": 1.0}
    off = SpecialTokenMask.from_cfg(schema_cfg().objective, tok, {0})
    same, m_off = off(r)
    assert same is r and m_off == {}


@pytest.mark.parametrize("name,think_pieces", [("qwen3", 1), pytest.param("qwen25", 3, marks=pytest.mark.slow)])
def test_the_real_qwen_tokenizers_mask_the_tags_and_end_of_turn(qwen_tokenizer, name, think_pieces):
    """Qwen3 writes <think> and </think> as one token each, Qwen2.5 as pieces (`<th`, `ink`, `>` …):
    the defaults mask exactly the tokens spelling their first occurrence and <|im_end|>."""
    tok = qwen_tokenizer(name)
    text = "<think>\n1+2=3. 3+4=7.\n</think>\n\n\\boxed{7}<|im_end|>"
    assert len(tok("<think>\n", add_special_tokens=False).input_ids) == (2 if think_pieces == 1 else 3)
    r = _rollouts(tok, [text])
    out, m = _masker(tok, stop=False)(r)
    masked = {i for i, v in enumerate(out.response_mask_B_T[0].tolist()) if v == 0}
    assert masked == _expected(tok, text, DEFAULT)
    ids = r.response_ids_B_T[0].tolist()
    assert ids[-1] == tok.convert_tokens_to_ids("<|im_end|>") and len(ids) - 1 in masked
    assert min(masked) == 0 and m["masked_tokens"] == len(masked) >= 3
