"""The estimator zoo (SPEC §1) against independent references: brute force over the vocabulary,
finite differences, TRL's generalised JSD, exact enumeration for the Monte-Carlo estimator."""

import itertools
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd_exp.config import schema_cfg
from opd_exp.core.types import Rollouts, StepBatch, left_pad, response_mask
from opd_exp.engines.hf_policy import HFPolicy
from opd_exp.engines.teacher_hf import HFTeacher
from opd_exp.methods.full_vocab import FullVocabOPD, divergence
from opd_exp.methods.rewards import RewardInputs, advantages, group_advantage
from opd_exp.methods.topk import TopKOPD


def _cfg(**objective):
    base = {"name": "full_vocab", "gamma": 0.0, "clip_eps": 0.2, "clip_eps_high": None,
            "divergence": "reverse_kl", "beta": 0.5, "k": 8, "support": "teacher",
            "renormalize": True, "gradient": "analytic", "weight": "student", "chunk_size": 4}
    base.update(objective)
    return schema_cfg({"objective": base, "rollout": {"temperature": 1.0},
                             "reward": {"name": "log_ratio", "alpha": 0.5, "scale_by_alpha": True,
                                        "clip": 5.0, "eps": 1e-6, "std_normalize": True,
                                        "mix_lambda": 0.5, "early_positions": 8}})


def _obj(cls, cfg):
    return cls(cfg.objective, cfg.reward, cfg.rollout.temperature)


def _model(world, name):
    return AutoModelForCausalLM.from_pretrained(world / name, dtype=torch.float64)


def _rollouts(seed=0, B=4, T=9, V=60, stop=2):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(5, V, (int(n),), generator=g).tolist()
               for n in torch.randint(2, 6, (B,), generator=g)]
    ids, mask = left_pad(prompts, pad_id=0)
    resp = torch.randint(5, V, (B, T), generator=g)
    resp[1, 4] = stop
    return Rollouts(ids, mask, resp, response_mask(resp, {stop}), group_B=torch.arange(B))


def _batch(teacher, r, needs, k=8):
    return StepBatch(r, HFTeacher(teacher, micro_batch_size=3, chunk_size=4).score(r, needs, k))


def _loss_and_grad(obj, model, batch, micro=64):
    model.zero_grad()
    n = batch.mask_B_T.sum().item()
    total = 0.0
    for s in range(0, batch.rollouts.size, micro):
        loss, _ = obj.loss(HFPolicy(model), batch.select(slice(s, s + micro)), n)
        loss.backward()
        total += loss.item()
    return total, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


# ---- divergences -----------------------------------------------------------------------------

def _brute(logp, logq, kind, beta):
    """Loops over the vocabulary in float64 from the definitions."""
    out = []
    for lp, lq in zip(logp.tolist(), logq.tolist()):
        p = [math.exp(x) for x in lp]
        q = [math.exp(x) for x in lq]
        kl = lambda a, b: sum(ai * (math.log(ai) - math.log(bi)) for ai, bi in zip(a, b) if ai > 0)  # noqa
        if kind == "reverse_kl":
            out.append(kl(p, q))
        elif kind == "forward_kl":
            out.append(kl(q, p))
        else:
            m = [(1 - beta) * pi + beta * qi for pi, qi in zip(p, q)]
            out.append(beta * kl(q, m) + (1 - beta) * kl(p, m))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3),
                                       ("jsd", 0.5), ("jsd", 0.9)])
def test_divergence_brute_force_and_finite_differences(seed, kind, beta):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(5, 11, generator=g, dtype=torch.float64) * 2
    xt = torch.randn(5, 11, generator=g, dtype=torch.float64) * 2
    d = divergence(xs.log_softmax(-1), xt.log_softmax(-1), kind, beta)
    assert torch.allclose(d, _brute(xs.log_softmax(-1), xt.log_softmax(-1), kind, beta), atol=1e-10)
    x = xs.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z: divergence(z.log_softmax(-1), xt.log_softmax(-1), kind, beta), (x,))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_divergence_matches_trl_generalized_jsd(beta):
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 7, 13, generator=g, dtype=torch.float64)
    t = torch.randn(3, 7, 13, generator=g, dtype=torch.float64)
    ref = gkd.GKDTrainer.generalized_jsd_loss(s, t, beta=beta, reduction="sum")
    ours = divergence(s.log_softmax(-1).reshape(-1, 13), t.log_softmax(-1).reshape(-1, 13),
                      "jsd", beta).sum()
    assert torch.allclose(ours, ref.to(ours.dtype), atol=1e-9)
    if beta == 1.0:  # TRL's β = 1 is the reverse KL, β = 0 the forward KL
        assert torch.allclose(ours, divergence(s.log_softmax(-1).reshape(-1, 13),
                                               t.log_softmax(-1).reshape(-1, 13), "reverse_kl").sum())


# ---- full vocabulary ------------------------------------------------------------------------

def test_full_vocab_equals_unchunked_reference_and_is_chunk_invariant(tiny_world):
    student, teacher = _model(tiny_world, "student"), _model(tiny_world, "teacher")
    r = _rollouts()
    batch = _batch(teacher, r, "hidden")
    # reference: full [B, T, V] logits of both models, brute force per position
    T = r.response_ids_B_T.shape[1]
    kw = dict(input_ids=r.input_ids_B_L, attention_mask=r.attention_mask_B_L,
              position_ids=r.position_ids_B_L)
    student.zero_grad()
    ls = student(**kw).logits[:, -T - 1:-1].log_softmax(-1)
    with torch.no_grad():
        lt = teacher(**kw).logits[:, -T - 1:-1].log_softmax(-1)
    per = (ls.exp() * (ls - lt)).sum(-1)
    ref_loss = (per * r.response_mask_B_T).sum() / r.response_mask_B_T.sum()
    ref_loss.backward()
    ref_grad = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
    with torch.no_grad():
        brute = _brute(ls[r.response_mask_B_T > 0], lt[r.response_mask_B_T > 0], "reverse_kl", 0)
    assert abs(brute.sum().item() / r.response_mask_B_T.sum().item() - ref_loss.item()) < 1e-10
    for chunk, micro in ((1, 64), (4, 3), (1000, 1)):
        loss, grad = _loss_and_grad(_obj(FullVocabOPD, _cfg(chunk_size=chunk)), student, batch, micro)
        assert abs(loss - ref_loss.item()) < 1e-10
        assert torch.allclose(grad, ref_grad, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("kind,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)])
def test_a_teacher_support_short_of_the_vocabulary_is_the_divergence_on_that_support(kind, beta):
    """Across tokenizers the teacher's log q̃ is −inf on the student tokens no teacher token maps
    to (methods/xtok.py mapped_logq): the divergence is over the support, p and q renormalised
    on it (a float64 reference on the support's columns), fused (reverse KL's closed form) and
    unfused alike; the student rows outside get exactly no gradient."""
    g = torch.Generator().manual_seed(5)
    H, V, B, T = 6, 13, 2, 5
    head_s, head_t = (torch.nn.Linear(H, V, bias=False).double() for _ in range(2))
    with torch.no_grad():
        for head in (head_s, head_t):
            head.weight.copy_(torch.randn(V, H, generator=g, dtype=torch.float64))
    out = torch.zeros(V, dtype=torch.bool)
    out[[2, 5, 11]] = True

    class Partial(torch.nn.Module):  # the teacher's log-probs, −inf outside its support
        def forward(self, h):
            return head_t(h).log_softmax(-1).masked_fill(out, -torch.inf)

    h_s = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    h_t = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 0, 1, 1, 0]], dtype=torch.float64)
    hs = h_s.clone().requires_grad_()
    ls, lt = head_s(hs)[..., ~out].log_softmax(-1), head_t(h_t)[..., ~out].log_softmax(-1)
    ref = (divergence(ls, lt.detach(), kind, beta) * mask).sum()
    ref_gh, ref_gw = torch.autograd.grad(ref, (hs, head_s.weight))
    obj = FullVocabOPD(_cfg(divergence=kind, beta=beta, chunk_size=2).objective, None, 1.0)
    hs = h_s.clone().requires_grad_()
    head_s.weight.grad = None
    loss = obj.summed(head_s, Partial(), hs, h_t, mask, V)
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - ref.item()) < 1e-10
    assert torch.allclose(hs.grad, ref_gh, atol=1e-10)
    assert torch.allclose(head_s.weight.grad, ref_gw, atol=1e-10)
    assert (head_s.weight.grad[out] == 0).all()
    with torch.no_grad():  # the same divergence outside autograd (evaluation, the probe)
        assert abs(obj.summed(head_s, Partial(), h_s, h_t, mask, V).item() - ref.item()) < 1e-10


# ---- top-K local support matching -------------------------------------------------------------

def test_topk_with_k_equal_v_is_full_vocab(tiny_world):
    student, teacher = _model(tiny_world, "student"), _model(tiny_world, "teacher")
    r = _rollouts(seed=3)
    V = student.config.vocab_size
    full = _loss_and_grad(_obj(FullVocabOPD, _cfg()), student, _batch(teacher, r, "hidden"))
    for support, needs in (("teacher", "topk"), ("student", "hidden"), ("union", "hidden")):
        cfg = _cfg(name="topk", k=V, support=support)
        got = _loss_and_grad(_obj(TopKOPD, cfg), student, _batch(teacher, r, needs, V))
        assert abs(got[0] - full[0]) < 1e-9
        assert torch.allclose(got[1], full[1], atol=1e-9, rtol=1e-7)


def _chunk(obj, logits, mask, teacher_logits):
    """The objective's per-chunk loss with identity heads: gradients land on the logits."""
    ident = torch.nn.Identity()
    logq = teacher_logits.log_softmax(-1)
    if obj.support == "teacher":
        v, i = logq.topk(obj.k, -1)
        return obj._chunk_loss(ident, ident, None, logits, mask, v, i)
    return obj._chunk_loss(ident, ident, None, logits, mask, teacher_logits)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("support", ["teacher", "student", "intersection", "union"])
def test_topk_support_reference_and_no_gradient_outside(seed, support):
    g = torch.Generator().manual_seed(seed)
    B, T, V, K = 2, 3, 20, 5
    s = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.float64)
    for renorm in (True, False):
        obj = _obj(TopKOPD, _cfg(name="topk", k=K, support=support, renormalize=renorm))
        loss, _ = _chunk(obj, s, mask, t)
        # reference by explicit sets
        ref = 0.0
        lp, lq = s.detach().log_softmax(-1), t.log_softmax(-1)
        for b, i in itertools.product(range(B), range(T)):
            St = set(lq[b, i].topk(K).indices.tolist())
            Ss = set(s.detach()[b, i].topk(K).indices.tolist())
            S = sorted({"teacher": St, "student": Ss, "intersection": St & Ss, "union": St | Ss}[support])
            if not S:
                continue
            a, c = lp[b, i, S], lq[b, i, S]
            if renorm:
                a, c = a.log_softmax(-1), c.log_softmax(-1)
            ref += (a.exp() * (a - c)).sum().item()
        assert abs(loss.item() - ref) < 1e-10, (renorm, loss.item(), ref)
        if renorm:  # nothing flows to tokens outside the support
            s.grad = None
            loss.backward()
            for b, i in itertools.product(range(B), range(T)):
                St = set(lq[b, i].topk(K).indices.tolist())
                Ss = set(s.detach()[b, i].topk(K).indices.tolist())
                S = {"teacher": St, "student": Ss, "intersection": St & Ss, "union": St | Ss}[support]
                outside = [v for v in range(V) if v not in S]
                assert s.grad[b, i, outside].abs().max().item() == 0


def test_topk_pg_with_student_weights_has_the_analytic_gradient():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 20, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 20, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.float64)
    grads = []
    for gradient in ("analytic", "pg"):
        s.grad = None
        _chunk(_obj(TopKOPD, _cfg(name="topk", k=6, gradient=gradient)), s, mask, t)[0].backward()
        grads.append(s.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-12)


# ---- invariants shared by every objective ----------------------------------------------------

OBJECTIVES = [("full_vocab", {}, "hidden"), ("full_vocab", {"divergence": "jsd"}, "hidden"),
              ("topk", {"support": "teacher"}, "topk"), ("topk", {"support": "union"}, "hidden"),
              ("topk", {"gradient": "pg", "weight": "teacher"}, "topk")]


@pytest.mark.parametrize("name,extra,needs", OBJECTIVES)
def test_student_equal_teacher_gives_exact_zero(tiny_world, name, extra, needs):
    student = _model(tiny_world, "student")
    teacher = _model(tiny_world, "student")  # the same weights
    r = _rollouts(seed=5)
    obj = _obj(FullVocabOPD if name == "full_vocab" else TopKOPD, _cfg(name=name, **extra))
    loss, grad = _loss_and_grad(obj, student, _batch(teacher, r, needs))
    assert abs(loss) < 1e-12 and grad.abs().max().item() < 1e-12


@pytest.mark.parametrize("name,extra,needs", OBJECTIVES)
def test_masked_tokens_and_micro_batching_change_nothing(tiny_world, name, extra, needs):
    student, teacher = _model(tiny_world, "student"), _model(tiny_world, "teacher")
    r = _rollouts(seed=6)
    obj = _obj(FullVocabOPD if name == "full_vocab" else TopKOPD, _cfg(name=name, **extra))
    ref = _loss_and_grad(obj, student, _batch(teacher, r, needs))
    r2 = r.select(slice(None))
    r2.response_ids_B_T = r.response_ids_B_T.clone()
    r2.response_ids_B_T[1, 5:] = 7  # row 1 stopped at t = 4: these tokens are masked
    for rr, micro in ((r2, 64), (r, 1), (r, 3)):
        got = _loss_and_grad(obj, student, _batch(teacher, rr, needs), micro)
        assert abs(got[0] - ref[0]) < 1e-10
        assert torch.allclose(got[1], ref[1], atol=1e-10, rtol=1e-8)


# ---- the sampled-token estimator is unbiased for γ = 1 ---------------------------------------

def test_sampled_token_gamma_1_matches_exact_sequence_reverse_kl_gradient():
    """Two-token sequences over V = 4: exact ∇ KL(p‖q) by enumerating all 16 sequences versus
    the mean of the sampled-token estimator −Σ_t A_t ∇log p(y_t), A from rewards.advantages."""
    g = torch.Generator().manual_seed(0)
    V = 4
    th1 = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    th2 = torch.randn(V, V, generator=g, dtype=torch.float64, requires_grad=True)
    q1 = torch.randn(V, generator=g, dtype=torch.float64).log_softmax(-1)
    q2 = torch.randn(V, V, generator=g, dtype=torch.float64).log_softmax(-1)

    def logp(y1, y2):
        return th1.log_softmax(-1)[y1], th2.log_softmax(-1)[y1, y2]

    exact = 0.0
    for y1, y2 in itertools.product(range(V), range(V)):
        a, b = logp(torch.tensor(y1), torch.tensor(y2))
        exact = exact + (a + b).exp() * (a + b - q1[y1] - q2[y1, y2])
    exact_grad = torch.autograd.grad(exact, (th1, th2))

    n = 200_000
    y1 = torch.multinomial(th1.detach().softmax(-1), n, replacement=True, generator=g)
    y2 = torch.multinomial(th2.detach().softmax(-1)[y1], 1, generator=g)[:, 0]
    lp1, lp2 = logp(y1, y2)
    logp_B_T = torch.stack([lp1, lp2], 1)
    logq_B_T = torch.stack([q1[y1], q2[y1, y2]], 1)
    cfg = _cfg().reward
    A, _ = advantages(RewardInputs(logq_B_T, logp_B_T.detach(), torch.ones(n, 2, dtype=torch.float64),
                                   torch.arange(n)), cfg, gamma=1.0)
    per_seq = -(A * logp_B_T).sum(1)  # one term per sampled sequence
    est = torch.autograd.grad(per_seq.mean(), (th1, th2), retain_graph=True)
    # Monte-Carlo standard error, from per-sample gradients on a subsample
    sub = [torch.cat([x.flatten() for x in torch.autograd.grad(per_seq[i], (th1, th2), retain_graph=True)])
           for i in range(1000)]
    se = torch.stack(sub).std(0) / n ** 0.5
    diff = torch.cat([(e - x).flatten() for e, x in zip(est, exact_grad)])
    assert (diff.abs() <= 5 * se + 1e-6).all(), (diff, se)
    # γ = 0 (token level) is biased: it misses the future-reward term of the first token
    A0, _ = advantages(RewardInputs(logq_B_T, logp_B_T.detach(), torch.ones(n, 2, dtype=torch.float64),
                                    torch.arange(n)), cfg, gamma=0.0)
    est0 = torch.autograd.grad(-(A0 * logp_B_T).sum(1).mean(), (th1,))[0]
    assert (est0 - exact_grad[0]).abs().max() > 10 * se[:V].max()


# ---- sequence rewards ------------------------------------------------------------------------

def test_group_advantage_and_mix():
    R = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    grp = torch.tensor([0, 0, 0, 1, 1, 1])
    A = group_advantage(R, grp, std_normalize=False, eps=1e-6)
    assert torch.allclose(A, torch.tensor([2 / 3, -1 / 3, -1 / 3, 0, 0, 0]))
    An = group_advantage(R, grp, std_normalize=True, eps=1e-6)
    assert torch.allclose(An[:3], A[:3] / torch.tensor([1.0, 0, 0]).std(unbiased=False), atol=1e-5)
    assert (An[3:] == 0).all()  # a group with one outcome carries no signal
    cfg = _cfg().reward
    cfg.name, cfg.mix_lambda = "mix", 0.25
    logq = torch.log(torch.full((6, 3), 0.5))
    logp = torch.log(torch.full((6, 3), 0.25))
    x = RewardInputs(logq, logp, torch.ones(6, 3), grp, R)
    Amix, r = advantages(x, cfg, gamma=0.0)
    assert torch.allclose(Amix, 0.25 * (logq - logp) + 0.75 * A[:, None])
    cfg.name = "verifiable"
    Av, _ = advantages(x, cfg, gamma=0.0)
    assert torch.allclose(Av, An[:, None].expand(6, 3), atol=1e-4)


def test_topk_teacher_entries_that_are_not_finite_are_not_in_the_support():
    """A teacher that returned fewer than K entries (-inf slots: e.g. padded ids dropped by the
    vLLM teacher) gives the loss of the K - 1 it returned, finite."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 20, generator=g, dtype=torch.float64)
    t = torch.randn(2, 3, 20, generator=g, dtype=torch.float64).log_softmax(-1)
    mask = torch.ones(2, 3, dtype=torch.float64)
    ident = torch.nn.Identity()
    v, i = t.topk(6, -1)
    v_hole = v.clone()
    v_hole[..., -1] = -float("inf")
    obj = _obj(TopKOPD, _cfg(name="topk", k=6))
    got = obj._chunk_loss(ident, ident, None, s, mask, v_hole, i)[0]
    ref = _obj(TopKOPD, _cfg(name="topk", k=5))._chunk_loss(ident, ident, None, s, mask,
                                                            v[..., :5], i[..., :5])[0]
    assert torch.isfinite(got) and torch.allclose(got, ref, atol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_reverse_kl_closed_form_gradient_equals_autograd(temperature):
    """The fused full-vocabulary path's closed-form reverse KL (loss and ∂/∂logits) = autograd
    through `divergence`, masked rows giving exactly zero gradient."""
    from opd_exp.methods.full_vocab import reverse_kl_and_grad
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 5, 17, generator=g, dtype=torch.float64) * 3
    logq = torch.randn(2, 5, 17, generator=g, dtype=torch.float64).mul(2).log_softmax(-1)
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 0, 0, 1, 1]], dtype=torch.float64)
    zr = z.clone().requires_grad_()
    ref = (divergence(torch.log_softmax(zr / temperature, -1), logq, "reverse_kl") * mask).sum()
    (ref_g,) = torch.autograd.grad(ref, zr)
    loss, grad = reverse_kl_and_grad(z.clone(), logq.clone(), mask, temperature)
    assert abs(loss.item() - ref.item()) < 1e-12
    assert torch.allclose(grad, ref_g, atol=1e-13)
    assert (grad[mask == 0] == 0).all()


def test_in_place_log_softmax_on_whole_and_sliced_logits():
    """log_softmax_ (the fused path's, `rows` positions at a time) = torch.log_softmax, in place,
    also on the real-vocabulary slice of padded logits (the padded columns untouched)."""
    from opd_exp.methods.full_vocab import log_softmax_
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 21, 50, generator=g, dtype=torch.float64) * 4
    ref = x.log_softmax(-1)
    row = 50 * 8  # bytes of one position: blocks of 1, 3 and all positions
    for budget in (row, 3 * row, None):
        y = x.clone()
        assert log_softmax_(y, budget) is y and torch.allclose(y, ref, atol=1e-12)
        padded = torch.randn(3, 21, 57, generator=g, dtype=torch.float64)
        ref_p, pad = padded[..., :50].log_softmax(-1), padded[..., 50:].clone()
        log_softmax_(padded[..., :50], budget)
        assert torch.allclose(padded[..., :50], ref_p, atol=1e-12) and torch.equal(padded[..., 50:], pad)
    for strided in (torch.randn(40, dtype=torch.float64)[::2], torch.randn(50, 7, dtype=torch.float64).T):
        ref_s = strided.log_softmax(-1)  # 1-D and transposed: no view merges them
        log_softmax_(strided, 8)
        assert torch.allclose(strided, ref_s, atol=1e-12)


def test_rethinking_only_stu_is_the_authors_formula():
    """`objective=topk_only_stu` (the Rethinking authors' default): S_t = the student's top-K,
    full-softmax log-probs, A_t(v) = −(log p(v) − log q(v))·p(v)/Σ_{u∈S_t} p(u) held constant,
    loss_t = −Σ_{v∈S_t} A_t(v) log p(v) — written out position by position here. The gradient
    reaches tokens outside S_t through the full softmax's normaliser."""
    from .conftest import compose

    cfg = compose(["objective=topk_only_stu"])
    o = cfg.objective
    assert (o.support, o.renormalize, o.gradient, o.weight, o.k) == ("student", False, "pg", "student", 16)
    g = torch.Generator().manual_seed(7)
    B, T, V, K = 2, 3, 24, 16
    s = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0]], dtype=torch.float64)
    obj = TopKOPD(o, cfg.reward, 1.0)
    loss, _ = _chunk(obj, s, mask, t)
    loss.backward()
    got = s.grad.clone()

    s2 = s.detach().clone().requires_grad_(True)
    ref = 0.0
    for b, i in itertools.product(range(B), range(T)):
        if not mask[b, i]:
            continue
        lp, lq = s2[b, i].log_softmax(-1), t[b, i].log_softmax(-1)
        S = sorted(range(V), key=lambda v: -s2[b, i, v].item())[:K]
        z = sum(math.exp(lp[v].item()) for v in S)
        for v in S:
            A = -(lp[v].item() - lq[v].item()) * math.exp(lp[v].item()) / z
            ref = ref - A * lp[v]
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-10
    assert torch.allclose(got, s2.grad, atol=1e-12)
    outside = [v for v in range(V) if v not in set(s[0, 0].detach().topk(K).indices.tolist())]
    assert got[0, 0, outside].abs().max() > 0  # full-softmax log-probs: the normaliser's gradient


def test_lm_head_chunks_are_bounded_in_logits_not_only_positions(tiny_world, monkeypatch):
    """objective.chunk_size caps a chunk's positions, and a chunk of B rows holds at most
    CHUNK_ELEMENTS logits (at V = 151,936 a 64-position chunk of 64 rows is 2.5 GB): fewer positions,
    the same loss, gradient, top-K and entropies."""
    from opd_exp.engines.hf_policy import topk_and_entropy
    from opd_exp.methods import full_vocab, head_logprobs
    student, teacher = _model(tiny_world, "student"), _model(tiny_world, "teacher")
    r = _rollouts(seed=3)
    batch, V = _batch(teacher, r, "hidden"), student.config.vocab_size
    obj = _obj(FullVocabOPD, _cfg(chunk_size=64))
    ref_loss, ref_grad = _loss_and_grad(obj, student, batch)
    ref_top = topk_and_entropy(HFPolicy(student), r, 5, 3, 64)
    monkeypatch.setattr(head_logprobs, "CHUNK_ELEMENTS", r.size * V * 2)  # 2 positions of 4 rows
    seen, apply = [], full_vocab.FusedHeadLoss.apply
    monkeypatch.setattr(full_vocab.FusedHeadLoss, "apply", lambda *a: seen.append(a[3]) or apply(*a))
    loss, grad = _loss_and_grad(obj, student, batch)
    assert seen == [2]  # was 64: the whole response in one chunk
    assert abs(loss - ref_loss) < 1e-10 and torch.allclose(grad, ref_grad, atol=1e-10, rtol=1e-8)
    for a, b in zip(topk_and_entropy(HFPolicy(student), r, 5, 3, 64), ref_top):  # 3-row micro-batches
        assert torch.allclose(a.double(), b.double(), atol=1e-10)
