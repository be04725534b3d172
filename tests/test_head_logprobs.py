"""The sampled tokens' log-probs from hidden states and the LM head, a chunk of positions at a
time (opd_exp/methods/head_logprobs.py), against brute force over the vocabulary and autograd's
numerical gradient check."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd_exp.engines.hf_policy import HFPolicy
from opd_exp.methods.head_logprobs import HeadTokenLogprobs, head_token_logprobs

from .test_packing import rollouts


def brute(h, W, ids, tau, vocab):
    return torch.log_softmax((h @ W[:vocab].T) / tau, -1).gather(-1, ids[..., None])[..., 0]


@pytest.mark.parametrize("tau,chunk", [(1.0, 4), (0.7, 3), (1.3, 64)])
def test_values_and_gradients_equal_brute_force_over_the_vocabulary(tau, chunk):
    g = torch.Generator().manual_seed(0)
    B, T, H, rows, vocab = 3, 10, 8, 40, 33  # 7 padded rows, never a target nor in a normaliser
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(rows, H, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    weights = torch.randn(B, T, generator=g, dtype=torch.float64)  # any loss downstream
    got = HeadTokenLogprobs.apply(h, W, ids, tau, vocab, chunk)
    (gh, gW) = torch.autograd.grad((got * weights).sum(), (h, W))
    want = brute(h, W, ids, tau, vocab)
    (wh, wW) = torch.autograd.grad((want * weights).sum(), (h, W))
    assert (got - want).abs().max() <= 1e-12
    assert (gh - wh).abs().max() <= 1e-12 and (gW - wW).abs().max() <= 1e-12
    assert (gW[vocab:] == 0).all()


def test_gradcheck():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    assert torch.autograd.gradcheck(lambda h, W: HeadTokenLogprobs.apply(h, W, ids, 0.8, 7, 2), (h, W))


def test_bfloat16_weights_give_the_float32_answer_within_bf16_rounding():
    g = torch.Generator().manual_seed(2)
    h, W = torch.randn(2, 6, 16, generator=g), torch.randn(50, 16, generator=g) / 4
    ids = torch.randint(0, 50, (2, 6), generator=g)
    want = brute(h, W, ids, 1.0, None)
    hb, Wb = h.bfloat16().requires_grad_(), W.bfloat16().requires_grad_()
    got = HeadTokenLogprobs.apply(hb, Wb, ids, 1.0, None, 4)
    assert got.dtype == torch.float32 and (got - want).abs().max() <= 0.1
    got.sum().backward()
    assert hb.grad.dtype == Wb.grad.dtype == torch.bfloat16


def test_bfloat16_weight_gradient_summed_over_chunks_stays_near_one_matmuls():
    """32 chunks summed in bf16 (as fused cross-entropy kernels do, no float32 [V, H] buffer):
    0.0070 relative error against float64, one matmul over all positions 0.0026."""
    g = torch.Generator().manual_seed(4)
    B, T, H, V = 1, 2048, 16, 1000
    h, W = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g) / 4
    ids = torch.randint(0, V, (B, T), generator=g)
    h64, W64 = h.double().requires_grad_(), W.double().requires_grad_()
    brute(h64, W64, ids, 1.0, None).sum().backward()

    def err(chunk):
        hb, Wb = h.bfloat16().requires_grad_(), W.bfloat16().requires_grad_()
        if chunk:
            HeadTokenLogprobs.apply(hb, Wb, ids, 1.0, None, chunk).sum().backward()
        else:
            brute(hb, Wb, ids, 1.0, None).float().sum().backward()
        return ((Wb.grad.double() - W64.grad).norm() / W64.grad.norm()).item()
    assert err(64) <= 3 * err(0) and err(64) <= 0.01, (err(64), err(0))


@pytest.mark.parametrize("packing", [False, True])
def test_the_policy_gives_the_whole_forwards_log_probs_and_gradients(tiny_world, packing, monkeypatch):
    """HFPolicy's default (LM head alone, chunked: here 7 positions a chunk) against the model's
    own forward."""
    from opd_exp.methods import head_logprobs

    monkeypatch.setattr(head_logprobs, "CHUNK_ELEMENTS", 500 * 7)  # one row of response tokens
    r = rollouts()
    m = r.response_mask_B_T.bool()
    model = AutoModelForCausalLM.from_pretrained(tiny_world / "student", dtype=torch.float64)
    alone, whole = HFPolicy(model, packing=packing, vocab_size=500), HFPolicy(model, head_alone=False,
                                                                            vocab_size=500)
    assert alone.head_alone and not whole.head_alone
    grads = []
    for view in (alone, whole):
        model.zero_grad()
        logp = view.token_logprobs(r, 0.7)
        (logp * torch.linspace(-1, 1, logp.numel()).view_as(logp).double()).sum().backward()
        grads.append((logp.detach(), [p.grad.clone() for p in model.parameters()]))
    (a, ga), (b, gb) = grads
    assert (a - b)[m].abs().max() <= 1e-10
    assert max((x - y).abs().max().item() for x, y in zip(ga, gb)) <= 1e-10


def test_the_head_scores_only_the_response_positions(tiny_world, monkeypatch):
    """The LM head runs at the N response tokens, not at the B × T of the padded batch; the
    padded positions' log-probs are 0, as before."""
    from opd_exp.engines import hf_policy

    seen, real = [], hf_policy.head_token_logprobs
    monkeypatch.setattr(hf_policy, "head_token_logprobs",
                        lambda h, *a, **kw: seen.append(h.shape[:2]) or real(h, *a, **kw))
    r = rollouts()
    m = r.response_mask_B_T.bool()
    assert not m.all()  # the fixture has padding
    logp = HFPolicy(AutoModelForCausalLM.from_pretrained(tiny_world / "student")).token_logprobs(r)
    assert seen == [(1, int(m.sum()))]
    assert torch.equal(logp[~m], torch.zeros(int((~m).sum()))) and (logp[m] < 0).all()


def test_the_head_never_forms_all_positions_logits_at_once():
    """No matmul output (forward or backward) is larger than one chunk's [B, C, V] logits."""
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(3)
    B, T, H, V, C = 2, 64, 8, 1000, 16
    head = torch.nn.Linear(H, V, bias=False)
    h = torch.randn(B, T, H, generator=g, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        head_token_logprobs(h, head, torch.randint(0, V, (B, T), generator=g), chunk=C).sum().backward()
    mm = [e.cpu_memory_usage for e in prof.events() if e.name in ("aten::mm", "aten::bmm", "aten::matmul")]
    assert mm and max(mm) <= B * C * V * 4 < B * T * V * 4


def _scaled(model):
    """The model, its forward halving the logits (as remote code or an unknown family might)."""
    base = type(model)

    class Scaled(base):
        def forward(self, *a, **kw):
            out = base.forward(self, *a, **kw)
            out.logits = out.logits * 0.5
            return out
    model.__class__ = Scaled
    return model


def _biased(model):
    W = model.get_output_embeddings().weight
    head = torch.nn.Linear(W.shape[1], W.shape[0], bias=True, dtype=W.dtype)
    with torch.no_grad():
        head.weight.copy_(W)
        head.bias.uniform_(-3, 3)
    model.set_output_embeddings(head)
    return model


@pytest.mark.parametrize("change", [_scaled, _biased])
def test_a_model_whose_forward_is_more_than_backbone_then_head_is_scored_by_its_forward(tiny_world, change):
    """No config key tells: the first rows scored show that the logits are not the head alone on
    the backbone's states; the sampled tokens' log-probs then come from the model's own forward,
    and what needs the head alone (packing, fused objectives, top-K scores) is refused."""
    from opd_exp.config import ConfigError
    from opd_exp.engines.hf_policy import head_alone_check

    r = rollouts()
    m = r.response_mask_B_T.bool()
    model = change(AutoModelForCausalLM.from_pretrained(tiny_world / "student"))
    plain = AutoModelForCausalLM.from_pretrained(tiny_world / "student")
    assert head_alone_check(plain, plain, r) is None and head_alone_check(model, model, r)
    view = HFPolicy(model)
    assert view.head_alone
    with torch.no_grad():
        got = view.token_logprobs(r)
        whole = HFPolicy(model, head_alone=False).token_logprobs(r)
    assert not view.head_alone and torch.equal(got, whole)
    with pytest.raises(ConfigError, match="on the LM head alone is not allowed"):
        view.response_hidden(r)
    with pytest.raises(ConfigError, match="learner.packing=true is not allowed"):
        HFPolicy(model, packing=True).token_logprobs(r)
    assert (got - HFPolicy(plain).token_logprobs(r))[m].abs().max() > 1e-3  # they do differ


@pytest.mark.parametrize("who,overrides", [
    ("student", ["objective=topk", "objective.k=4"]), ("student", ["diag.every=2"]),
    ("teacher", ["objective=full_vocab"]), ("teacher", ["teacher.packing=true"])])
def test_what_needs_the_head_alone_is_refused_at_start_for_a_model_whose_logits_are_more(
        tmp_path, use_tiny_world, monkeypatch, who, overrides):
    """A biased LM head (Phi-2's kind) on the student or the teacher: refused while the run is
    built, before its first step (not at the first diagnostics step, hours in)."""
    from opd_exp.config import ConfigError
    from opd_exp.engines import hf_models
    from opd_exp.train import train

    from .conftest import TINY_RUN, compose

    load = hf_models.load_model

    def loaded(mcfg, field):
        model = load(mcfg, field)
        return _biased(model) if field == f"pair.{who}" else model

    monkeypatch.setattr(hf_models, "load_model", loaded)
    for module in ("opd_exp.loop.build", "opd_exp.engines.teacher_hf"):
        monkeypatch.setattr(f"{module}.load_model", loaded)
    field = {"objective": "objective.name"}.get(overrides[0].split("=")[0], overrides[0].split("=")[0])
    with pytest.raises(ConfigError, match=rf"^{field}=.* \(pair.{who}\) is not allowed with .*: its LM head is not a Linear"):
        train(compose(TINY_RUN + overrides + ["trainer.steps=1", "eval.every=0"]), tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists() or "train/loss" not in (tmp_path / "metrics.jsonl").read_text()
