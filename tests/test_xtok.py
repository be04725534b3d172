"""Cross-tokenizer OPD (issue 25): byte alignment against brute force on the real Qwen3 and Qwen3.6
tokenizers, token bytes, chunk rewards and credit, and the reduction to today's numbers when a
chunk is one token on each side."""

from __future__ import annotations

import random
from itertools import accumulate

import pytest
import torch
from omegaconf import OmegaConf

from opd_exp.engines.token_bytes import token_bytes
from opd_exp.methods import rewards
from opd_exp.methods.xtok import (Chunk, align, chunk_index, chunk_rewards, credit_weights,
                                  last_of_chunk, map_topk, prefix_map)
from opd_exp.toyworld import qwen_vocab

ALPHABET = "ab c1234567890+=.\n{}\\日本語éß😀Ωж𠀀𓀀🜁"  # the last three: split across tokens


def random_text(rng: random.Random) -> str:
    s = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 60)))
    return s if rng.random() < 0.7 else f"<think>{s}</think> \\boxed{{{s[:5]}}}"


def brute_chunks(a: list[bytes], b: list[bytes]) -> list[Chunk]:
    """Chunks by enumeration: the common end offsets of both runs, and the tokens ending in each
    interval between consecutive common offsets."""
    ea, eb = list(accumulate(map(len, a))), list(accumulate(map(len, b)))
    common = sorted(set(ea) & set(eb))
    out, lo = [], 0
    for hi in common:
        sa = [i for i, e in enumerate(ea) if lo < e <= hi]
        sb = [j for j, e in enumerate(eb) if lo < e <= hi]
        out.append(Chunk(sa[0], sa[-1] + 1, sb[0], sb[-1] + 1))
        lo = hi
    return out


@pytest.fixture(scope="module")
def toks(qwen_vocab_cache):
    return {name: qwen_vocab.load(name) for name in ("qwen3", "qwen36", "qwen25")}


@pytest.fixture(scope="module")
def tables(toks):
    return {name: token_bytes(tok) for name, tok in toks.items()}


def test_token_bytes_spell_the_text(toks, tables):
    rng = random.Random(0)
    for name, tok in toks.items():
        for _ in range(200):
            text = random_text(rng)
            ids = tok(text, add_special_tokens=False).input_ids
            assert b"".join(tables[name][i] for i in ids) == text.encode(), (name, text)
    # a character split across byte-level tokens: no piece decodes alone, the bytes still join
    ids = toks["qwen3"]("𠀀", add_special_tokens=False).input_ids
    assert len(ids) == 3 and b"".join(tables["qwen3"][i] for i in ids) == "𠀀".encode()


def test_alignment_matches_brute_force_on_real_tokenizers(toks, tables):
    rng = random.Random(1)
    one_to_one = total = 0
    for _ in range(300):
        text = random_text(rng)
        a = [tables["qwen3"][i] for i in toks["qwen3"](text, add_special_tokens=False).input_ids]
        b = [tables["qwen36"][i] for i in toks["qwen36"](text, add_special_tokens=False).input_ids]
        chunks = align([len(x) for x in a], [len(x) for x in b])
        assert chunks == brute_chunks(a, b)
        for c in chunks:  # each chunk: the same bytes on both sides
            assert b"".join(a[c.s0:c.s1]) == b"".join(b[c.t0:c.t1])
        assert chunks[-1].s1 == len(a) and chunks[-1].t1 == len(b)
        one_to_one += sum(c.s1 - c.s0 == 1 and c.t1 - c.t0 == 1 for c in chunks)
        total += len(chunks)
    assert 0 < one_to_one < total  # the two vocabularies do differ on these strings


def test_alignment_random_byte_splits_and_truncation():
    """Splits anywhere, multi-byte characters cut across tokens; a longer side's tail after
    the last common offset forms no chunk."""
    rng = random.Random(2)
    for _ in range(500):
        data = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 30))).encode()

        def split() -> list[bytes]:
            cuts = sorted(rng.sample(range(1, len(data)), rng.randint(0, len(data) - 1))) if len(data) > 1 else []
            return [data[i:j] for i, j in zip([0, *cuts], [*cuts, len(data)])]
        a, b = split(), split()
        assert align([len(x) for x in a], [len(x) for x in b]) == brute_chunks(a, b)
        cut = rng.randint(1, len(b))  # the teacher read a prefix only
        got = align([len(x) for x in a], [len(x) for x in b[:cut]])
        assert got == brute_chunks(a, b[:cut])
        assert sum(len(x) for x in a[:got[-1].s1]) <= sum(len(x) for x in b[:cut]) if got else True


def test_credit_weights_sum_to_one_per_chunk():
    torch.manual_seed(0)
    chunk = torch.tensor([[0, 0, 1, 2, 2, 2, -1], [0, 1, 1, -1, -1, -1, -1]])
    logp = -torch.rand(2, 7) * 3
    for credit in ("last", "uniform", "surprisal"):
        w = credit_weights(chunk, logp, credit)
        for b in range(2):
            for c in chunk[b].unique():
                if c >= 0:
                    assert w[b][chunk[b] == c].sum().item() == pytest.approx(1.0)
        assert (w[chunk < 0] == 0).all()
    w = credit_weights(chunk, logp, "surprisal")
    assert w[0, 0].item() == pytest.approx(logp[0, 0].item() / logp[0, :2].sum().item())
    assert last_of_chunk(chunk).tolist()[0] == [False, True, True, False, False, True, False]


@pytest.mark.parametrize("name", ["log_ratio", "power", "log_clip", "log_tanh", "zscore"])
@pytest.mark.parametrize("credit", ["last", "uniform", "surprisal"])
def test_one_token_chunks_give_todays_rewards(name, credit):
    torch.manual_seed(1)
    B, T = 3, 9
    logq, logp = -torch.rand(B, T) * 8, -torch.rand(B, T) * 8
    mask = (torch.arange(T)[None] < torch.tensor([[9], [5], [7]])).float()
    chunk = torch.where(mask > 0, torch.arange(T).expand(B, T), -1)
    cfg = OmegaConf.create({"name": name, "alpha": 0.5, "scale_by_alpha": True, "clip": 2.0, "eps": 1e-6})
    x = rewards.RewardInputs(logq, logp, mask, torch.arange(B))
    today = rewards.token_reward(name, x, cfg)
    chunked = rewards.token_reward(name, rewards.RewardInputs(
        logq * mask, logp, mask, torch.arange(B), chunk_B_T=chunk, credit=credit), cfg)
    assert torch.allclose(today, chunked, atol=1e-6)


def test_chunk_reward_is_the_reward_of_the_chunk_sums():
    """A 2-token student chunk against a 1-token teacher chunk: log-ratio on the sums, credited;
    a chunk with a masked token counts for nothing."""
    logp = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
    chunk = torch.tensor([[0, 0, 1, 1]])
    logq_last = torch.tensor([[0.0, -4.0, 0.0, -1.0]])  # log q(c) on each chunk's last token
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # chunk 1's second token is masked
    fn = lambda lq, lp, m: (lq - lp) * m  # noqa: E731
    r, last = chunk_rewards(fn, logq_last, logp, mask, chunk, "uniform")
    assert last.tolist() == [[0.0, 1.0, 0.0, 0.0]]
    assert r[0].tolist() == pytest.approx([-0.5, -0.5, 0.0, 0.0])  # (−4 − (−3)) / 2 each
    assert chunk_index([Chunk(0, 2, 0, 1), Chunk(2, 3, 1, 3)], 4).tolist() == [0, 0, 1, -1]
    assert chunk_index([Chunk(0, 2, 0, 1), Chunk(2, 3, 1, 3)], 4, "teacher").tolist() == [0, 1, 1, -1]


@pytest.mark.parametrize("name", ["cross_tokenizer_toy", "cross_tokenizer_qwen"])
def test_cross_tokenizer_experiments_pass_the_start_up_checks(name):
    from opd_exp.loop.pair import check_cross_tokenizer
    from .conftest import compose
    check_cross_tokenizer(compose([f"+experiment={name}"]))


@pytest.mark.parametrize("override, field", [
    ("objective=topk_only_stu", "objective.support"),
    ("pair.teacher_prompt=student", "pair.teacher_prompt"), ("diag.every=5", "diag.every"),
    ("+pair.teachers={long:{path:'toy:teacher_long'}}", "pair.teachers"),
    ("prompts.score=pass_rate", "prompts.score"), ("schedule=cold_start", "schedule.name"),
    ("objective.rollouts_from=teacher", "objective.rollouts_from"), ("xtok.loss=uld", "xtok.loss")])
def test_what_a_cross_tokenizer_pair_does_not_support_is_refused_in_one_line(override, field):
    from opd_exp.config import ConfigError
    from opd_exp.loop.pair import check_cross_tokenizer
    from .conftest import compose
    with pytest.raises(ConfigError, match=rf"^{field}=.*is not allowed: the teacher's tokenizer differs") as e:
        check_cross_tokenizer(compose(["+experiment=cross_tokenizer_toy", override]))
    assert "\n" not in str(e.value)


def test_prefix_map_matches_an_enumeration_on_a_small_pair():
    student = [b"a", b"b", b"ab", b"abc", b"\xe6", b"\xe6\x97", b"<x>", b""]
    teacher = [b"abcd", b"ab", b"b", b"\xe6\x97\xa5", b"<y>", b"c", b"", b"abc"]
    got = prefix_map(student, teacher).tolist()
    for j, tb in enumerate(teacher):  # the longest student token that is a prefix (first id on ties)
        cands = [(len(sb), -i) for i, sb in enumerate(student) if sb and tb.startswith(sb)]
        assert got[j] == (-max(cands)[1] if cands else -1)
    assert got == [3, 2, 1, 5, -1, -1, -1, 3]


def test_special_tokens_map_by_exact_bytes_only():
    """A teacher special token the student lacks is residual (not the text token `<|`); one the
    student has maps to it; no teacher text token lands on a student special token."""
    student = [b"<|", b"<", b"<|im_end|>", b"<think>", b"a"]
    teacher = [b"<|im_end|>", b"<|endoftext|>", b"<think>x", b"<|a", b"<think>"]
    assert prefix_map(student, teacher).tolist() == [2, 0, 3, 0, 3]  # bytes alone
    assert prefix_map(student, teacher, {2, 3}, {0, 1, 4}).tolist() == [2, -1, 1, 0, 3]


def test_prefix_map_on_qwen36_to_qwen3(tables):
    to_s = prefix_map(tables["qwen3"], tables["qwen36"])
    assert (to_s >= 0).float().mean() > 0.99  # byte-level: every byte is a student token
    for j in torch.randperm(len(to_s), generator=torch.Generator().manual_seed(0))[:2000].tolist():
        i = to_s[j].item()
        if i >= 0:
            assert tables["qwen36"][j].startswith(tables["qwen3"][i]) and tables["qwen3"][i]
    # byte-level BPE: every byte is a student token, so only a byte-less teacher token is residual
    assert all(tables["qwen36"][j] == b"" for j in (to_s < 0).nonzero().flatten().tolist())


def test_map_topk_merges_duplicates_and_keeps_the_residual():
    to_s = torch.tensor([0, 0, 1, -1, 2])  # teacher ids 0 and 1 both map to student 0
    logq = torch.log(torch.tensor([[0.4, 0.3, 0.1, 0.05], [0.5, 0.2, 0.1, 0.0]]))
    idx = torch.tensor([[0, 1, 3, 2], [4, 3, 0, 1]])
    lq, sid, residual = map_topk(logq, idx, to_s)
    p = torch.where(torch.isfinite(lq), lq.exp(), torch.zeros(()))
    assert p[0].tolist() == pytest.approx([0.7, 0.0, 0.0, 0.05]) and sid[0].tolist() == [0, 0, 0, 1]
    assert residual.tolist() == pytest.approx([0.1, 0.2])
    assert p[1].tolist() == pytest.approx([0.5, 0.0, 0.1, 0.0])  # 0.0 stays out (−inf input)
    assert (p.sum(-1) + residual).tolist() == pytest.approx(torch.exp(logq).sum(-1).tolist())


def test_map_topk_in_slices_equals_whole():
    torch.manual_seed(3)
    to_s = torch.randint(-1, 5, (20,))
    logq = torch.log_softmax(torch.randn(37, 6), -1)
    idx = torch.randint(0, 20, (37, 6))
    whole, sliced = map_topk(logq, idx, to_s), map_topk(logq, idx, to_s, rows=8)
    for a, b in zip(whole, sliced):
        assert torch.equal(a, b)


def test_alignment_with_zero_byte_tokens():
    """A zero-byte token (an empty added token) joins the chunk that follows it, or none at the end."""
    a, b = [b"ab", b"", b"c", b"d"], [b"a", b"bc", b"", b"d", b""]
    chunks = align([len(x) for x in a], [len(x) for x in b])
    assert chunks == [Chunk(0, 3, 0, 2), Chunk(3, 4, 2, 4)]
    for c in chunks:
        assert b"".join(a[c.s0:c.s1]) == b"".join(b[c.t0:c.t1])


def test_sentencepiece_token_bytes():
    """A Metaspace / byte-fallback vocabulary (Llama 2, Mistral): ▁ is a space, <0xNN> a byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "▁Hello": 1, "▁wor": 2, "ld": 3, "<0xE6>": 4, "<0x97>": 5, "<0xA5>": 6, "▁": 7}
    t = Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok = PreTrainedTokenizerFast(tokenizer_object=t)
    tb = token_bytes(tok)
    assert tb[1] == b" Hello" and tb[4] == b"\xe6" and tb[7] == b" "


def test_a_sentencepiece_teachers_dummy_prefix_space_is_its_own(toks):
    """A teacher whose tokenizer prepends a space (Metaspace, Llama 2 / Mistral) reads `1+2=3` as
    ` 1+2=3`: that space is not the student's; the rows still align, one token to one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from opd_exp.engines.teacher_xtok import XTokTeacher
    vocab = {"<unk>": 0, "▁": 1, "1": 2, "+": 3, "2": 4, "=": 5, "3": 6, "▁1": 7,
             **{f"<0x{b:02X}>": 8 + b for b in range(256)}}
    t = Tokenizer(models.BPE(vocab, [("▁", "1")], unk_token="<unk>", byte_fallback=True))
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    teacher = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<unk>")
    s_tok = toks["qwen3"]
    xtok = XTokTeacher(None, s_tok, teacher, {s_tok.eos_token_id})
    ids = s_tok("1+2=3", add_special_tokens=False).input_ids
    t_ids, chunks = xtok.align_row([], ids)
    assert teacher.convert_ids_to_tokens(t_ids) == ["▁1", "+", "2", "=", "3"]
    assert [(c.s0, c.s1, c.t0, c.t1) for c in chunks] == [(i, i + 1, i, i + 1) for i in range(5)]
