"""The cross-tokenizer teacher (engines/teacher_xtok.py): the same-tokenizer reduction is exact
for every reward and credit; across the Qwen3 and Qwen3.6 tokenizers the chunks cover the same
bytes, the template's tokens are left out, the stop token meets the teacher's end token, and the
chunk scores add up to the teacher's log-probability of the whole response."""

from __future__ import annotations

import random

import pytest
import torch
from omegaconf import OmegaConf

from opd_exp.config.schema import schema_cfg
from opd_exp.core.types import StepBatch, TeacherScores, rollouts_from_samples
from opd_exp.engines.hf_models import load_model, load_tokenizer
from opd_exp.engines.teacher_hf import HFTeacher
from opd_exp.engines.teacher_xtok import XTokTeacher
from opd_exp.methods.sampled_token import SampledTokenOPD
from opd_exp.toyworld import task
from opd_exp.toyworld.qwen_models import render

REWARDS = ["log_ratio", "power", "log_clip", "log_tanh", "zscore", "mix"]


def _cfg(path: str):
    return OmegaConf.create({"path": path, "dtype": "float32", "revision": None, "trust_remote_code": False})


def _rollouts(tok, n: int, seed: int, tail=lambda ids: ids):
    """Task responses written by `tok` (canonical tokenizations), each after its chat prompt."""
    rng = random.Random(seed)
    prompts, samples = [], []
    for _ in range(n):
        p, r = render(tok, task.make_problem(rng, rng.choice(task.LEVELS)))
        prompts.append(tok(p, add_special_tokens=False).input_ids)
        samples.append([(tail(tok(r, add_special_tokens=False).input_ids), None)])
    return rollouts_from_samples(prompts, samples, tok.pad_token_id, [tok.eos_token_id])


@pytest.mark.parametrize("credit", ["last", "uniform", "surprisal"])
def test_same_tokenizer_gives_todays_numbers(use_tiny_world, credit):
    tok = load_tokenizer(_cfg("toy:qwen3_student"), "pair.student")
    model = load_model(_cfg("toy:qwen3_teacher"), "pair.teacher")
    inner = HFTeacher(model, 4, 8, len(tok))
    xtok = XTokTeacher(inner, tok, tok, {tok.eos_token_id}, credit)
    r = _rollouts(tok, 6, 0)
    direct, chunked = inner.score(r, "sampled"), xtok.score(r, "sampled")
    assert chunked.metrics["xtok/one_to_one_share"] == 1.0
    assert chunked.metrics["xtok/aligned_share"] == 1.0
    torch.manual_seed(0)
    logp_old = direct.logp_B_T - torch.rand_like(direct.logp_B_T)  # any student
    for name in REWARDS:
        cfg = schema_cfg({"reward": {"name": name, "alpha": 0.5, "clip": 2.0},
                          "objective": {"gamma": 0.5}})
        obj = SampledTokenOPD(cfg.objective, cfg.reward, 1.0)
        batch = StepBatch(r, direct, logp_old_B_T=logp_old, correct_B=torch.ones(r.size))
        a, m_a = obj.prepare(batch)
        b, m_b = obj.prepare(StepBatch(r, chunked, logp_old_B_T=logp_old, correct_B=torch.ones(r.size)))
        assert torch.allclose(a.advantages_B_T, b.advantages_B_T, atol=1e-6), name
        assert m_a["kl_sampled"] == pytest.approx(m_b["kl_sampled"], abs=1e-6)


@pytest.fixture(scope="module")
def qwen_pair(tiny_world):
    """The Qwen3 student's tokenizer and the Qwen3.6 teacher (the tiny world's)."""
    import os
    old = os.environ.get("OPD_EXP_TOY_DIR")
    os.environ["OPD_EXP_TOY_DIR"] = str(tiny_world)
    try:
        s_tok = load_tokenizer(_cfg("toy:qwen3_student"), "pair.student")
        t_tok = load_tokenizer(_cfg("toy:qwen36_teacher"), "pair.teacher")
        teacher = load_model(_cfg("toy:qwen36_teacher"), "pair.teacher")
    finally:
        os.environ.pop("OPD_EXP_TOY_DIR") if old is None else os.environ.__setitem__("OPD_EXP_TOY_DIR", old)
    return s_tok, t_tok, teacher


def test_across_qwen3_and_qwen36(qwen_pair):
    s_tok, t_tok, teacher = qwen_pair
    inner = HFTeacher(teacher, 4, 8, len(t_tok))
    xtok = XTokTeacher(inner, s_tok, t_tok, {s_tok.eos_token_id})
    r = _rollouts(s_tok, 4, 1)
    rng = random.Random(1)
    t_prompts = []
    for _ in range(4):  # the same problems under the teacher's template (opens <think>)
        p, _ = render(t_tok, task.make_problem(rng, rng.choice(task.LEVELS)))
        t_prompts.append(t_tok(p, add_special_tokens=False).input_ids)
    r = r.with_prompts(t_prompts, s_tok.pad_token_id)
    for b in range(r.size):
        ids = r.response_ids_B_T[b][r.response_mask_B_T[b] > 0].tolist()
        t_ids, chunks = xtok.align_row(t_prompts[b], ids)
        assert ids[0] == s_tok.convert_tokens_to_ids("<think>") and chunks[0].s0 == 1  # the template's
        assert t_ids[0] != t_tok.convert_tokens_to_ids("<think>")
        assert (chunks[-1].s0, chunks[-1].s1) == (len(ids) - 1, len(ids))  # stop ↔ teacher's end
        assert t_ids[-1] == t_tok.eos_token_id
        for c in chunks[:-1]:
            assert (b"".join(xtok.s_bytes[i] for i in ids[c.s0:c.s1])
                    == b"".join(xtok.t_bytes[i] for i in t_ids[c.t0:c.t1]))
        # Σ over chunks of log q(chunk) = the teacher's log-prob of its whole response
        seq = torch.tensor([t_prompts[b] + t_ids])
        with torch.no_grad():
            logits = teacher(seq).logits[0, len(t_prompts[b]) - 1:-1, :len(t_tok)].log_softmax(-1)
        whole = logits.gather(-1, torch.tensor(t_ids)[:, None]).sum().item()
        scores = xtok.score(r.select(slice(b, b + 1)), "sampled")
        assert scores.logp_B_T.sum().item() == pytest.approx(whole, abs=1e-3)
        assert scores.chunk_B_T[0, 0].item() == -1  # <think>: no signal


def test_invalid_utf8_and_truncation_get_no_signal(qwen_pair):
    s_tok, t_tok, _ = qwen_pair

    class Inner:
        def score(self, rollouts, needs, k=0):
            return TeacherScores(logp_B_T=-torch.ones(rollouts.response_ids_B_T.shape))
    xtok = XTokTeacher(Inner(), s_tok, t_tok, {s_tok.eos_token_id})
    ids = s_tok("ab 12", add_special_tokens=False).input_ids + s_tok("𠀀", add_special_tokens=False).input_ids[:2]
    t_ids, chunks = xtok.align_row([], ids)  # cut inside a character, no stop token
    assert chunks and chunks[-1].s1 == len(ids) - 2  # the two pieces of the cut character: none
    assert t_tok.decode(t_ids) == "ab 12"


def test_teacher_rows_fit_its_context(qwen_pair):
    """A teacher that spells the response in more tokens than its context leaves (vLLM refuses
    such a prompt): the row is cut to fit and the chunks past the cut get no signal."""
    s_tok, t_tok, _ = qwen_pair
    seen = []

    class Inner:  # a vLLM-like teacher: refuses a row longer than its context
        def score(self, rollouts, needs, k=0):
            P, U = rollouts.prompt_mask_B_P.sum(-1), rollouts.response_mask_B_T.sum(-1)
            seen.append(int((P + U).max()))
            assert seen[-1] <= limit, "the engine would refuse this row"
            return TeacherScores(logp_B_T=-torch.ones(rollouts.response_ids_B_T.shape))
    r = _rollouts(s_tok, 3, 2)
    t_prompts = [t_tok("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
                       add_special_tokens=False).input_ids] * 3
    r = r.with_prompts(t_prompts, s_tok.pad_token_id)
    whole = XTokTeacher(Inner(), s_tok, t_tok, {s_tok.eos_token_id})
    limit = 10 ** 6
    full = whole.score(r, "sampled")
    longest = seen[-1]
    limit = longest - 5
    cut = XTokTeacher(Inner(), s_tok, t_tok, {s_tok.eos_token_id}, max_len=limit).score(r, "sampled")
    assert seen[-1] == limit
    assert cut.metrics["xtok/cut_rows"] >= 1 and full.metrics["xtok/cut_rows"] == 0
    assert cut.metrics["xtok/aligned_share"] < full.metrics["xtok/aligned_share"]
    kept = cut.chunk_B_T >= 0
    assert (full.chunk_B_T[kept] == cut.chunk_B_T[kept]).all()  # the chunks before the cut unchanged
    assert (cut.logp_B_T[~kept] == 0).all()


@pytest.mark.parametrize("backend,max_model_len,context,reads", [
    ("vllm", 256, 4096, 255), ("vllm_server", 0, 4096, 4095), ("hf", 256, 4096, 256), ("hf", 0, None, None),
    ("vllm", 0, None, None)])
def test_what_the_teacher_engine_reads(backend, max_model_len, context, reads):
    """The cut's length: the teacher's context, less the token a vLLM teacher must generate."""
    from opd_exp.loop.build import teacher_reads
    cfg = OmegaConf.create({"teacher": {"backend": backend, "max_model_len": max_model_len}})
    assert teacher_reads(cfg, context) == reads


def test_template_tokens_are_left_out_in_one_piece_or_three(qwen_pair):
    """Qwen3.6's prompt opens `<think>\n`: a Qwen3 student's `<think>` `\n` (or `<think>` alone,
    as the toy writes it) and a Qwen2.5 student's `<th` `ink` `>\n` are the template's; a prompt
    ending in `assistant\n` leaves all."""
    from opd_exp.toyworld import qwen_vocab
    _, t_tok, _ = qwen_pair
    opened = t_tok("<|im_start|>assistant\n<think>\n", add_special_tokens=False).input_ids
    plain = t_tok("<|im_start|>assistant\n", add_special_tokens=False).input_ids
    cases = {("qwen3", "<think>1+2"): 1, ("qwen3", "<think>\n1+2"): 2, ("qwen25", "<think>1+2"): 3,
             ("qwen25", "<think>\n1+2"): 3, ("qwen25", "<think>\n\n1+2"): 3}
    for (family, start), skipped in cases.items():
        s_tok = qwen_vocab.load(family)
        xtok = XTokTeacher(None, s_tok, t_tok, {s_tok.eos_token_id})
        ids = s_tok(start + "=3.</think> \\boxed{3}<|im_end|>", add_special_tokens=False).input_ids
        t_ids, chunks = xtok.align_row(opened, ids)
        assert chunks[0].s0 == skipped, (family, start, s_tok.convert_ids_to_tokens(ids[:4]))
        assert t_tok.decode(t_ids[:3]) == "1+2", (family, start)  # no second <think>, no newline
        t_ids, chunks = xtok.align_row(plain, ids)
        assert chunks[0].s0 == 0 and t_ids[0] == t_tok.convert_tokens_to_ids("<think>")


def test_padding_that_is_a_stop_token_is_not_read(qwen_pair):
    """Qwen pads with <|endoftext|>, one of its stop ids: a short row ends at its own stop."""
    from opd_exp.toyworld import qwen_vocab
    _, t_tok, _ = qwen_pair
    s_tok = qwen_vocab.load("qwen3")
    stops = {s_tok.convert_tokens_to_ids("<|im_end|>"), s_tok.pad_token_id}
    assert s_tok.pad_token_id in stops
    long, short = (s_tok(x + "<|im_end|>", add_special_tokens=False).input_ids for x in ("12+34=46.", "1"))
    r = rollouts_from_samples([[1], [1]], [[(long, None)], [(short, None)]], s_tok.pad_token_id, sorted(stops))
    xtok = XTokTeacher(None, s_tok, t_tok, stops)
    ids, mask = r.response_ids_B_T[1].tolist(), r.response_mask_B_T[1].tolist()
    assert ids[len(short)] == s_tok.pad_token_id and xtok._length(ids, mask) == len(short)
    mask[len(short) - 1] = 0.0  # the stop token masked (objective.mask_stop_token): still read
    assert xtok._length(ids, mask) == len(short)


def test_topk_same_tokenizer_reduction_and_mass_across(use_tiny_world, qwen_pair):
    """Top-K through the cross-tokenizer path: the same tokenizer gives today's support and loss;
    across Qwen3 / Qwen3.6 the support sits on each chunk's first token, on student ids (the
    mass bookkeeping against an enumeration: tests/test_xtok.py)."""
    from opd_exp.engines.hf_policy import HFPolicy
    from opd_exp.methods.topk import TopKOPD
    tok = load_tokenizer(_cfg("toy:qwen3_student"), "pair.student")
    inner = HFTeacher(load_model(_cfg("toy:qwen3_teacher"), "pair.teacher"), 4, 8, len(tok))
    r = _rollouts(tok, 4, 2)
    direct = inner.score(r, "topk", 8)
    chunked = XTokTeacher(inner, tok, tok, {tok.eos_token_id}).score(r, "topk", 8)
    on = r.response_mask_B_T > 0
    assert torch.equal(chunked.topk_idx_B_T_K[on], direct.topk_idx_B_T_K[on])
    assert torch.allclose(chunked.topk_logq_B_T_K[on], direct.topk_logq_B_T_K[on])
    cfg = schema_cfg({"objective": {"name": "topk", "k": 8}}).objective
    student = HFPolicy(load_model(_cfg("toy:qwen3_student"), "pair.student"), vocab_size=len(tok))
    losses = [TopKOPD(cfg, None, 1.0).loss(student, StepBatch(r, s), r.response_mask_B_T.sum())[0].item()
              for s in (direct, chunked)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)

    s_tok, t_tok, teacher = qwen_pair
    xtok = XTokTeacher(HFTeacher(teacher, 4, 8, len(t_tok)), s_tok, t_tok, {s_tok.eos_token_id})
    r = _rollouts(s_tok, 3, 3)
    rng = random.Random(3)
    r = r.with_prompts([t_tok(render(t_tok, task.make_problem(rng, rng.choice(task.LEVELS)))[0],
                              add_special_tokens=False).input_ids for _ in range(3)], s_tok.pad_token_id)
    s = xtok.score(r, "topk", 8)
    assert 0 < s.metrics["xtok/mapped_mass"] + s.metrics["xtok/residual_mass"] <= 1 + 1e-6
    first = torch.isfinite(s.topk_logq_B_T_K).any(-1)
    assert not first[:, 0].any()  # the template's <think>: no support
    assert (s.topk_idx_B_T_K[first] < len(s_tok)).all()


def test_full_vocab_same_tokenizer_reduction_and_the_mapped_distribution_across(use_tiny_world, qwen_pair):
    """The full vocabulary through the cross-tokenizer path: the same tokenizer gives today's loss
    for every divergence (≤ 1e-6); across Qwen3 / Qwen3.6 the teacher's distribution at each
    chunk's first token is its softmax carried onto the student's ids by the byte-prefix map
    (against a plain sum of probabilities), the loss and gradient are finite, and only the chunks'
    first tokens are trained."""
    from opd_exp.engines.hf_policy import HFPolicy
    from opd_exp.methods.full_vocab import FullVocabOPD
    from opd_exp.methods.xtok import first_of_chunk
    tok = load_tokenizer(_cfg("toy:qwen3_student"), "pair.student")
    inner = HFTeacher(load_model(_cfg("toy:qwen3_teacher"), "pair.teacher"), 4, 8, len(tok))
    student = HFPolicy(load_model(_cfg("toy:qwen3_student"), "pair.student"), vocab_size=len(tok))
    r = _rollouts(tok, 3, 2)
    direct, chunked = inner.score(r, "hidden"), XTokTeacher(inner, tok, tok, {tok.eos_token_id}).score(r, "hidden")
    assert chunked.metrics["xtok/residual_mass"] < 1e-6
    n = r.response_mask_B_T.sum()
    for kind in ("reverse_kl", "forward_kl", "jsd"):
        cfg = schema_cfg({"objective": {"name": "full_vocab", "divergence": kind}}).objective
        a, b = (FullVocabOPD(cfg, None, 1.0).loss(student, StepBatch(r, s), n)[0].item() for s in (direct, chunked))
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7), kind

    s_tok, t_tok, teacher = qwen_pair
    inner = HFTeacher(teacher, 4, 8, len(t_tok))
    xtok = XTokTeacher(inner, s_tok, t_tok, {s_tok.eos_token_id})
    r_student = _rollouts(s_tok, 3, 3)
    rng = random.Random(3)  # the teacher reads the same responses after its own prompts
    r = r_student.with_prompts([t_tok(render(t_tok, task.make_problem(rng, rng.choice(task.LEVELS)))[0],
                                      add_special_tokens=False).input_ids for _ in range(3)], s_tok.pad_token_id)
    seen = {}
    score = inner.score

    def spy(rollouts, needs, k=0):  # the teacher's own hidden states, on its own tokens
        out = score(rollouts, needs, k)
        seen["h"] = out.hidden_B_T_H
        return out

    inner.score = spy
    s = xtok.score(r, "hidden")
    assert 0 < s.metrics["xtok/mapped_mass"] <= 1 and s.metrics["xtok/residual_mass"] >= 0
    at = first_of_chunk(s.chunk_B_T)
    assert at.any() and not at[:, 0].any()  # the template's <think>: no chunk
    for b in range(r.size):  # each chunk's first student token holds its first teacher token's state
        ids = r.response_ids_B_T[b][r.response_mask_B_T[b] > 0].tolist()
        prompt = r.prompt_ids_B_P[b][r.prompt_mask_B_P[b] > 0].tolist()
        for c in xtok.align_row(prompt, ids)[1]:
            assert torch.equal(s.hidden_B_T_H[b, c.s0], seen["h"][b, c.t0])
    assert (s.hidden_B_T_H[~at] == 0).all()
    h_N_H = s.hidden_B_T_H[at]
    logq_t = inner.view.lm_head(h_N_H)[..., :len(t_tok)].double().log_softmax(-1)
    keep = xtok.to_student >= 0
    ref = torch.zeros(len(h_N_H), len(s_tok), dtype=torch.float64).index_add_(
        1, xtok.to_student[keep], logq_t[:, keep].exp())
    got = s.lm_head(h_N_H).double()
    assert torch.allclose(got.exp(), ref, atol=1e-6)
    assert torch.equal(torch.isneginf(got), ref == 0)
    cfg = schema_cfg({"objective": {"name": "full_vocab"}}).objective
    obj, n = FullVocabOPD(cfg, None, 1.0), r.response_mask_B_T.sum()
    loss, _ = obj.loss(student, StepBatch(r_student, s), n)
    with torch.no_grad():  # only the chunks' first tokens are trained
        firsts = obj.summed(student.lm_head, s.lm_head, student.response_hidden(r_student), s.hidden_B_T_H,
                            r.response_mask_B_T * at, student.vocab_size) / n
    assert loss.item() == pytest.approx(firsts.item(), rel=1e-6)
    loss.backward()
    grads = [p.grad for p in student.model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and loss.item() > 0 and all(torch.isfinite(x).all() for x in grads)


@pytest.mark.slow
@pytest.mark.parametrize("arm", [["objective=topk", "objective.k=8", "xtok.loss=lsm"],
                                 ["objective=topk", "objective.k=8", "xtok.loss=uld_hybrid"],
                                 ["objective=full_vocab", "teacher=hf"]])
def test_distributions_across_tokenizers_train(use_tiny_world, tmp_path, arm):
    from .conftest import TINY_RUN, compose
    from .test_train_e2e import TINY_PAIRS, two_finite_steps
    cfg = compose(["+experiment=cross_tokenizer_toy", *TINY_RUN, *TINY_PAIRS["cross_tokenizer_toy"],
                   *arm, "trainer.steps=2", "eval.every=0"])
    for r in two_finite_steps(cfg, tmp_path):
        assert r["xtok/mapped_mass"] > 0 and r.get("train/support_size", 1) > 0


def test_probe_reports_the_vocabularies_and_the_alignment(use_tiny_world, tmp_path):
    """`probe` on a cross-tokenizer pair: the vocabulary overlap in its check, the alignment's
    shares measured on the student's rollouts, pass rates on both sides; no id comparison."""
    from opd_exp.commands.probe import run_probe

    from .conftest import TINY_RUN, compose
    from .test_train_e2e import TINY_PAIRS
    report = run_probe(compose(["+experiment=cross_tokenizer_toy", *TINY_RUN, *TINY_PAIRS["cross_tokenizer_toy"],
                                "probe.prompts=4", "probe.samples=2"]), tmp_path)
    check = next(c for c in report["checks"] if c["check"] == "vocabulary")
    assert check["status"] == "warn" and "of the student's tokens are teacher tokens" in check["detail"]
    m = report["measured"]
    assert 0 < m["xtok_aligned_share"] <= 1 and 0 < m["xtok_one_to_one_share"] <= 1
    assert "overlap_mass_teacher" not in m and report["verdict"] in ("go", "caution", "no-go")
    assert not any(r.startswith("not measured") for r in report["reasons"])


@pytest.mark.parametrize("loss", ["uld", "uld_hybrid"])
def test_uld_ablations_score_and_train_on_the_same_positions(use_tiny_world, qwen_pair, loss):
    """xtok.loss=uld|uld_hybrid: the teacher's own top-K at the chunks' first tokens (the same
    positions as LSM's support), exact-byte matches marked; the loss has a gradient."""
    from opd_exp.engines.hf_policy import HFPolicy
    from opd_exp.methods.topk import TopKOPD
    s_tok, t_tok, teacher = qwen_pair
    inner = HFTeacher(teacher, 4, 8, len(t_tok))
    lsm = XTokTeacher(inner, s_tok, t_tok, {s_tok.eos_token_id})
    uld = XTokTeacher(inner, s_tok, t_tok, {s_tok.eos_token_id}, loss=loss)
    r = _rollouts(s_tok, 3, 4)
    a, b = lsm.score(r, "topk", 8), uld.score(r, "topk", 8)
    assert torch.equal(torch.isfinite(a.topk_logq_B_T_K).any(-1), torch.isfinite(b.topk_logq_B_T_K).any(-1))
    at = torch.isfinite(b.topk_logq_B_T_K).any(-1)
    assert (b.topk_exact_B_T_K[at] >= 0).float().mean() > 0.5  # Qwen3.6's digits are Qwen3's
    cfg = schema_cfg({"objective": {"name": "topk", "k": 8}}).objective
    student = HFPolicy(load_model(_cfg("toy:qwen3_student"), "pair.student"), vocab_size=len(s_tok))
    loss_value, m = TopKOPD(cfg, None, 1.0).loss(student, StepBatch(r, b), r.response_mask_B_T.sum())
    loss_value.backward()
    assert loss_value.item() > 0 and m["support_size"] == pytest.approx(at.sum().item() / r.response_mask_B_T.sum().item())


def test_uld_on_a_shared_vocabulary_is_refused(use_tiny_world):
    from opd_exp.config import ConfigError
    from opd_exp.loop.pair import load_pair

    from .conftest import compose
    cfg = compose(["objective=topk", "xtok.loss=uld"])
    with pytest.raises(ConfigError, match=r"^xtok.loss='uld' is not allowed: the ULD ablations"):
        load_pair(cfg, cfg.pair.student)
