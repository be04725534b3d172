"""Sampled-token OPD: log-probs, gradients and normalisation against independent references."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd_exp.config import schema_cfg
from opd_exp.core.types import Rollouts, StepBatch, TeacherScores, left_pad, response_mask
from opd_exp.engines.hf_policy import HFPolicy, token_logprobs
from opd_exp.engines.learner_torch import TorchLearner
from opd_exp.methods.importance import truncated_is_weights
from opd_exp.methods.sampled_token import SampledTokenOPD


def _obj(cls, cfg):
    return cls(cfg.objective, cfg.reward, cfg.rollout.temperature)


def _model(world, name="student"):
    return AutoModelForCausalLM.from_pretrained(world / name, dtype=torch.float64)


def _rollouts(seed=0, B=5, T=7, V=50, stop=3):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(5, V, (int(n),), generator=g).tolist()
               for n in torch.randint(2, 6, (B,), generator=g)]
    ids, mask = left_pad(prompts, pad_id=0)
    resp = torch.randint(5, V, (B, T), generator=g)
    resp[1, 3] = stop  # one row stops early
    return prompts, Rollouts(ids, mask, resp, response_mask(resp, {stop}),
                             group_B=torch.arange(B))


def test_response_mask_keeps_first_stop_and_drops_after():
    r = torch.tensor([[5, 6, 2, 7, 2], [5, 5, 5, 5, 5], [2, 9, 9, 9, 9]])
    assert response_mask(r, {2}).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_token_logprobs_match_unpadded_per_sequence_forward(tiny_world):
    """Left padding and position ids must not change any log-prob: compare with one
    unpadded forward per sequence and a full log-softmax."""
    model = _model(tiny_world)
    prompts, r = _rollouts()
    logp = token_logprobs(model, r)
    for b, prompt in enumerate(prompts):
        seq = torch.tensor([prompt + r.response_ids_B_T[b].tolist()])
        logits = model(input_ids=seq).logits[0]
        ref = torch.log_softmax(logits, -1)
        for t in range(r.response_ids_B_T.shape[1]):
            expect = ref[len(prompt) + t - 1, r.response_ids_B_T[b, t]] * r.response_mask_B_T[b, t]
            assert abs(logp[b, t].item() - expect.item()) < 1e-9


def _cfg(reward="log_ratio", gamma=0.0, **kw):
    return schema_cfg({
        "reward": {"name": reward, "alpha": 0.5, "scale_by_alpha": True, "clip": 5.0,
                   "eps": 1e-6, "std_normalize": True, "mix_lambda": 0.5, "early_positions": 8},
        "objective": {"gamma": gamma, "clip_eps": 0.2, "clip_eps_high": None},
        "rollout": {"temperature": 1.0},
        "learner": {"lr": 1e-3, "betas": [0.9, 0.98], "weight_decay": 0.0, "warmup_steps": 0,
                    "max_grad_norm": 0.0, "micro_batch_size": kw.get("micro", 64),
                    "minibatches": 1}})


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("reward,gamma", [("log_ratio", 0.0), ("power", 0.0), ("log_ratio", 1.0),
                                          ("power", 0.7)])
def test_gradient_is_reinforce_with_global_token_mean(tiny_world, reward, gamma):
    """grad = −(1/N) Σ_t m_t A_t ∇log p(y_t), N = valid tokens of the whole step, whatever the
    micro-batch size; A built independently here from the definitions."""
    student, teacher = _model(tiny_world), _model(tiny_world, "teacher")
    _, r = _rollouts(seed=1)
    cfg = _cfg(reward, gamma)
    logq = token_logprobs(teacher, r).detach()
    obj = _obj(SampledTokenOPD, cfg)
    with torch.no_grad():
        logp_old = token_logprobs(student, r)
    batch, _ = obj.prepare(StepBatch(r, TeacherScores(logq), logp_old_B_T=logp_old))

    # reference: rewards and reward-to-go written from the definitions, one autograd pass
    mask = r.response_mask_B_T
    q, p = logq.exp(), logp_old.exp()
    rew = (torch.log(q) - torch.log(p)) if reward == "log_ratio" else (q ** 0.5 - p ** 0.5) / 0.5
    rew = rew * mask
    T = rew.shape[1]
    A = torch.stack([sum(gamma ** (u - t) * rew[:, u] for u in range(t, T)) for t in range(T)], 1)
    student.zero_grad()
    ref_loss = -(A * mask * token_logprobs(student, r)).sum() / mask.sum()
    ref_loss.backward()
    ref = _grads(student).clone()

    for micro in (1, 2, 64):
        student.zero_grad()
        n = mask.sum().item()
        for s in range(0, r.size, micro):
            loss, _ = obj.loss(HFPolicy(student), batch.select(slice(s, s + micro)), n)
            loss.backward()
        assert torch.allclose(_grads(student), ref, atol=1e-10, rtol=1e-8), micro


def test_masked_tokens_get_zero_gradient_and_identical_models_give_zero(tiny_world):
    student = _model(tiny_world)
    _, r = _rollouts(seed=2)
    cfg = _cfg()
    obj = _obj(SampledTokenOPD, cfg)
    with torch.no_grad():
        logp = token_logprobs(student, r)
    # the teacher IS the student: every log-ratio reward is 0, so the loss and gradient are 0
    batch, m = obj.prepare(StepBatch(r, TeacherScores(logp.clone()), logp_old_B_T=logp))
    assert m["reward_mean"] == 0 and m["kl_sampled"] == 0
    student.zero_grad()
    loss, _ = obj.loss(HFPolicy(student), batch, r.response_mask_B_T.sum().item())
    loss.backward()
    assert loss.item() == 0 and _grads(student).abs().max().item() == 0

    # masked (post-stop) tokens: changing them changes nothing
    logq = torch.randn_like(logp)
    b1, _ = obj.prepare(StepBatch(r, TeacherScores(logq), logp_old_B_T=logp))
    r2 = r.select(slice(None))
    r2.response_ids_B_T = r.response_ids_B_T.clone()
    r2.response_ids_B_T[1, 4:] = 7  # row 1 stopped at t = 3
    logq2 = logq.clone()
    logq2[1, 4:] = 5.0
    with torch.no_grad():
        logp2 = token_logprobs(student, r2)
    b2, _ = obj.prepare(StepBatch(r2, TeacherScores(logq2), logp_old_B_T=logp2))
    grads = []
    for b in (b1, b2):
        student.zero_grad()
        obj.loss(HFPolicy(student), b, r.response_mask_B_T.sum().item())[0].backward()
        grads.append(_grads(student).clone())
    assert torch.equal(grads[0], grads[1])


def test_rollout_engine_importance_weights_are_truncated_ratios():
    """rollout.is_cap: A_t is multiplied by min(p_old / π_rollout, cap) on valid tokens."""
    _, r = _rollouts(seed=4)
    g = torch.Generator().manual_seed(0)
    logq, logp_old = torch.randn(r.response_ids_B_T.shape, generator=g), -torch.rand(
        r.response_ids_B_T.shape, generator=g)
    w = torch.tensor([0.5, 1.0, 1.5, 3.0])[torch.randint(0, 4, logq.shape, generator=g)]
    r.logp_B_T = (logp_old - w.log()) * r.response_mask_B_T  # the engine's log-probs
    obj = _obj(SampledTokenOPD, _cfg())
    plain, _ = obj.prepare(StepBatch(r, TeacherScores(logq), logp_old_B_T=logp_old))
    batch, m = truncated_is_weights(StepBatch(r, TeacherScores(logq), logp_old_B_T=logp_old), 2.0)
    weighted, _ = obj.prepare(batch)
    mask = r.response_mask_B_T
    expect = plain.advantages_B_T * w.clamp(max=2.0) * mask
    assert torch.allclose(weighted.advantages_B_T, expect, atol=1e-6)
    assert m["is_truncated_frac"] == pytest.approx(((w > 2) * mask).sum().item() / mask.sum().item())
    assert m["is_weight_mean"] == pytest.approx((w.clamp(max=2.0) * mask).sum().item()
                                                / mask.sum().item())


def test_learner_reports_preclip_grad_norm_and_clips(tiny_world):
    student = _model(tiny_world)
    _, r = _rollouts(seed=3)
    cfg = _cfg()
    cfg.learner.max_grad_norm = 1e-3
    obj = _obj(SampledTokenOPD, cfg)
    learner = TorchLearner(student, cfg.learner)
    logq = torch.randn(r.response_ids_B_T.shape, dtype=torch.float64) - 3
    batch = StepBatch(r, TeacherScores(logq))
    batch.logp_old_B_T = learner.logprobs(batch, 1.0)
    batch, _ = obj.prepare(batch)
    # independent norm of the unclipped gradient
    student.zero_grad()
    obj.loss(HFPolicy(student), batch, r.response_mask_B_T.sum().item())[0].backward()
    ref_norm = _grads(student).norm().item()
    before = [p.detach().clone() for p in student.parameters()]
    m = learner.update(batch, obj)
    assert abs(m["grad_norm"] - ref_norm) < 1e-8 * max(1, ref_norm)
    assert ref_norm > 1e-3  # so clipping was active
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


class _NaNAt:
    """Wraps an objective: the loss of the micro-batches in `bad` (call indices) is NaN."""

    def __init__(self, obj, bad):
        self.obj, self.bad, self.calls = obj, set(bad), 0
        self.teacher_needs, self.needs_old_logp, self.temperature = "sampled", True, obj.temperature

    def prepare(self, batch):
        return self.obj.prepare(batch)

    def loss(self, policy, mb, n_tokens):
        loss, m = self.obj.loss(policy, mb, n_tokens)
        self.calls += 1
        return (loss * float("nan") if self.calls - 1 in self.bad else loss), m


def test_a_nan_loss_never_reaches_the_weights(tiny_world):
    """A NaN loss in one of two minibatches: that optimizer step is skipped (weights, optimizer
    and scheduler untouched), counted, and visible in grad_norm_max; the other one applies."""
    student = _model(tiny_world)
    _, r = _rollouts(seed=3)
    cfg = _cfg(micro=64)
    cfg.learner.max_grad_norm = 1.0
    cfg.learner.minibatches = 1
    learner = TorchLearner(student, cfg.learner)
    obj = _NaNAt(_obj(SampledTokenOPD, cfg), bad={0})
    logq = torch.randn(r.response_ids_B_T.shape, dtype=torch.float64) - 3
    batch = StepBatch(r, TeacherScores(logq))
    batch.logp_old_B_T = learner.logprobs(batch, 1.0)
    batch, _ = obj.prepare(batch)
    before = [p.detach().clone() for p in student.parameters()]
    m = learner.update(batch, obj)
    assert m["skipped_steps"] == 1 and math.isnan(m["grad_norm_max"])
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))
    assert learner.scheduler.last_epoch == 0 and not learner.optimizer.state
    m = learner.update(batch, obj)  # the next step is fine and trains
    assert m["skipped_steps"] == 0 and math.isfinite(m["grad_norm_max"])
    assert all(torch.isfinite(p).all() for p in student.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


class _FixedPolicy:
    """A PolicyView whose token log-probs are given (to place ratios exactly)."""
    vocab_size = None

    def __init__(self, logp_B_T):
        self.logp_B_T = logp_B_T

    def token_logprobs(self, rollouts, temperature=1.0):
        return self.logp_B_T * rollouts.response_mask_B_T


def test_clip_frac_counts_tokens_whose_loss_is_the_clipped_term():
    """PPO's clip fraction: ratio 0.5 with A > 0 is outside [0.8, 1.2] but its unclipped term is
    the minimum, so it is not clipped; ratio 1.5 with A > 0 is; ratio 1.5 with A < 0 is not."""
    _, r = _rollouts(seed=7, B=2, T=4)
    r.response_mask_B_T = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    old = torch.zeros(2, 4)
    ratio = torch.tensor([[0.5, 1.5, 1.5, 1.0], [1.5, 1.5, 1.5, 1.5]])
    A = torch.tensor([[1.0, 1.0, -1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    obj = _obj(SampledTokenOPD, _cfg())
    batch = StepBatch(r, TeacherScores(old), logp_old_B_T=old, advantages_B_T=A)
    _, m = obj.loss(_FixedPolicy(ratio.log()), batch, 4.0)
    assert m["clip_frac"] == pytest.approx(1 / 4)


def _step_batch(learner, obj, seed=3, B=5):
    _, r = _rollouts(seed=seed, B=B)
    batch = StepBatch(r, TeacherScores(torch.randn(r.response_ids_B_T.shape, dtype=torch.float64) - 3))
    batch.logp_old_B_T = learner.logprobs(batch, 1.0)
    return obj.prepare(batch)[0]


def test_train_lr_is_the_rate_the_step_applied(tiny_world):
    """AdamW's first step moves every coordinate with a clear gradient by the rate itself
    (m̂/√v̂ = ±1, no decay): the largest |Δw| is the rate applied; during a warm-up of 4 steps
    that is lr/4, which `lr` must report (it used to report the next step's, 2·lr/4)."""
    student = _model(tiny_world)
    cfg = _cfg()
    cfg.learner.warmup_steps, cfg.learner.lr = 4, 1e-3
    obj = _obj(SampledTokenOPD, cfg)
    learner = TorchLearner(student, cfg.learner)
    before = [p.detach().clone() for p in student.parameters()]
    m = learner.update(_step_batch(learner, obj), obj)
    moved = max((a - b).abs().max().item() for a, b in zip(before, student.parameters()))
    assert moved == pytest.approx(2.5e-4, rel=1e-3) and m["lr"] == pytest.approx(2.5e-4, rel=1e-12)
    cfg.learner.minibatches = 2  # two optimizer steps: the mean of the two rates applied
    assert learner.update(_step_batch(learner, obj, B=4), obj)["lr"] == pytest.approx((0.5e-3 + 0.75e-3) / 2)


def test_the_cold_start_schedule_and_a_fresh_optimizer_at_the_switch(tiny_world):
    """Two cold-start steps (their own rate, warm-up, cosine), then OPD: its warm-up restarts at
    the switch and, with `reset`, its first step equals a fresh learner's from the same weights."""
    import copy

    from opd_exp.engines.learner_torch import Phases, make_scheduler

    cfg = _cfg()
    cfg.learner.warmup_steps, cfg.learner.lr = 2, 1e-3
    phases = Phases(cold_steps=4, cold_lr=8e-3, cold_warmup=2, cold_decay="cosine", reset=True)
    sched = make_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3), cfg.learner, phases)
    rates = []
    for _ in range(7):
        rates.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    # warm-up over 2 steps (1/2, 2/2), then cosine over the 2 after it (1, 1/2), then the objective
    assert rates == pytest.approx([4e-3, 8e-3, 8e-3, 4e-3, 0.5e-3, 1e-3, 1e-3])

    obj = _obj(SampledTokenOPD, cfg)
    reset = TorchLearner(_model(tiny_world), cfg.learner, phases=Phases(2, 8e-3, 0, "constant", True))
    kept = TorchLearner(_model(tiny_world), cfg.learner, phases=Phases(2, 8e-3, 0, "constant", False))
    batches = [_step_batch(reset, obj, seed=s) for s in (3, 4, 5)]
    for b in batches[:2]:  # the cold start (the same batches, the same weights in both)
        reset.update(b, obj)
        kept.update(b, obj)
    assert not reset.optimizer.state and kept.optimizer.state  # cleared at the switch
    fresh = TorchLearner(copy.deepcopy(reset.model), cfg.learner)
    for learner in (reset, kept, fresh):
        m = learner.update(batches[2], obj)
        assert m["lr"] == pytest.approx(0.5e-3)  # the objective's warm-up, from the switch
    for a, b in zip(reset.model.parameters(), fresh.model.parameters()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(kept.model.parameters(), fresh.model.parameters()))
