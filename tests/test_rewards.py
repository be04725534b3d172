"""Reward maths against independent references (SPEC §1.2)."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from opd_exp.methods.rewards import RewardInputs, log_clip, log_tanh, reward_to_go, zscore
from opd_exp.methods.rewards import log_ratio as _log_ratio
from opd_exp.methods.rewards import power as _power


def _cfg(alpha=1.0, scale=True, clip=5.0):
    return OmegaConf.create({"alpha": alpha, "scale_by_alpha": scale, "clip": clip, "eps": 1e-6})


def _x(logq, logp, mask):
    return RewardInputs(logq, logp, mask, torch.arange(logq.shape[0]))


def log_ratio(logq, logp, mask, cfg):
    return _log_ratio(_x(logq, logp, mask), cfg)


def power(logq, logp, mask, cfg):
    return _power(_x(logq, logp, mask), cfg)


def _logps(seed, shape=(8, 33)):
    g = torch.Generator().manual_seed(seed)
    # log-probs from ~1e-9 to 1, float64 so the references are exact
    logq = -torch.rand(shape, generator=g, dtype=torch.float64) * 20
    logp = -torch.rand(shape, generator=g, dtype=torch.float64) * 20
    mask = (torch.rand(shape, generator=g) > 0.2).double()
    return logq, logp, mask


@pytest.mark.parametrize("seed", range(10))
def test_power_tends_to_log_ratio_as_alpha_to_0(seed):
    logq, logp, mask = _logps(seed)
    ref = log_ratio(logq, logp, mask, None)
    for alpha, tol in ((1e-3, 0.25), (1e-5, 2.5e-3), (1e-8, 2.5e-6)):
        # |BC_a(q) − BC_a(p) − (log q − log p)| ≤ a (log² q + log² p)/2 · e^… : shrinks ∝ a
        err = (power(logq, logp, mask, _cfg(alpha)) - ref).abs().max().item()
        assert err < tol, (alpha, err)


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("alpha", [0.1, 0.25, 0.5, 1.0, 2.0, 5.0])
def test_power_bounds_sign_and_reference(seed, alpha):
    logq, logp, mask = _logps(seed)
    r = power(logq, logp, mask, _cfg(alpha))
    # independent reference: the Box-Cox transform written from its definition
    bc = lambda u: (u ** alpha - 1) / alpha  # noqa: E731
    ref = (bc(logq.exp()) - bc(logp.exp())) * mask
    assert torch.allclose(r, ref, atol=1e-12, rtol=1e-9)
    assert r.abs().max().item() <= 1 / alpha + 1e-12
    lr = log_ratio(logq, logp, mask, None)
    # never the opposite sign (with q, p ~ e^-20 and large alpha both powers underflow to 0)
    assert ((torch.sign(r) == torch.sign(lr)) | (r == 0)).all()
    assert (torch.sign(r) == torch.sign(lr)).float().mean() > 0.5
    assert (r[mask == 0] == 0).all()


def test_power_alpha_one_is_probability_difference_and_unscaled_variant():
    logq, logp, mask = _logps(0)
    assert torch.allclose(power(logq, logp, mask, _cfg(1.0)), (logq.exp() - logp.exp()) * mask)
    a = 0.5
    assert torch.allclose(power(logq, logp, mask, _cfg(a, scale=False)),
                          a * power(logq, logp, mask, _cfg(a)))


def test_power_small_alpha_is_stable_where_naive_cancels():
    logq = torch.tensor([[-1e-3]], dtype=torch.float32)
    logp = torch.tensor([[-2e-3]], dtype=torch.float32)
    r = power(logq, logp, torch.ones(1, 1), _cfg(1e-6)).item()
    assert math.isclose(r, 1e-3, rel_tol=1e-3)  # naive (q^a − p^a)/a in float32 gives 0


@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.9, 1.0])
def test_reward_to_go_brute_force(gamma):
    r = torch.randn(5, 17, dtype=torch.float64)
    A = reward_to_go(r, gamma)
    for b in range(5):
        for t in range(17):
            ref = sum(gamma ** (u - t) * r[b, u].item() for u in range(t, 17))
            assert abs(A[b, t].item() - ref) < 1e-10


def test_posthoc_stabilisers():
    logq, logp, mask = _logps(0)
    lr = log_ratio(logq, logp, mask, None)
    x = _x(logq, logp, mask)
    assert torch.equal(log_clip(x, _cfg(clip=5.0)), lr.clamp(-5, 5) * mask)
    t = log_tanh(x, _cfg(clip=5.0))
    assert torch.allclose(t, 5 * torch.tanh(lr / 5) * mask) and t.abs().max() < 5
    z = zscore(x, _cfg())
    vals = z[mask > 0]
    assert abs(vals.mean().item()) < 1e-9 and abs(vals.std(unbiased=False).item() - 1) < 1e-5
    assert (z[mask == 0] == 0).all()
