"""Token-overlap diagnostics (SPEC §4) against independent references: plain-Python brute force over the
vocabulary (sorted lists, sets, loops), hand-computed entropies and position buckets."""

import math
import random

import pytest
import torch

from opd_exp.diagnostics.tokens import (by_position, entropy, masked_mean, overlap_exact, overlap_from_topk,
                                        position_edges, summarise, topk_entropy)

V, K, N = 40, 5, 64


def _rows(seed: int, dtype=torch.float64):
    """Student/teacher log-prob rows whose top-K overlap ranges from none to full (teacher = student + noise
    of a per-row scale), plus sharp rows so the entropies differ."""
    g = torch.Generator().manual_seed(seed)
    zp = torch.randn(N, V, generator=g, dtype=torch.float64) * torch.linspace(0.5, 4.0, N, dtype=torch.float64)[:, None]
    scale = torch.linspace(0.0, 6.0, N, dtype=torch.float64)[:, None]
    zq = zp + scale * torch.randn(N, V, generator=g, dtype=torch.float64)
    return zp.log_softmax(-1).to(dtype), zq.log_softmax(-1).to(dtype)


def _top(row: list[float], k: int) -> list[int]:
    return sorted(range(len(row)), key=lambda v: -row[v])[:k]


def _brute(lp: list[float], lq: list[float], k: int) -> dict[str, float]:
    """One position in plain Python: sets from sorted lists, sums of probabilities, loops."""
    p, q = [math.exp(x) for x in lp], [math.exp(x) for x in lq]
    common = set(_top(lp, k)) & set(_top(lq, k))
    mp, mq = sum(p[v] for v in common), sum(q[v] for v in common)
    adv = float("nan")
    if common:
        adv = 0.0
        for v in common:
            pbar, qbar = p[v] / mp, q[v] / mq
            adv += pbar * (math.log(qbar) - math.log(pbar))
    hp = -sum(x * math.log(x) for x in p if x > 0)
    hq = -sum(x * math.log(x) for x in q if x > 0)
    return {"ratio": len(common) / k, "top1": float(_top(lp, 1) == _top(lq, 1)), "mass_student": mp, "mass_teacher": mq, "advantage": adv,
            "entropy_gap": abs(hq - hp)}


def _brute_rows(logp, logq, k):
    rows = [_brute(a, b, k) for a, b in zip(logp.double().tolist(), logq.double().tolist())]
    return {key: torch.tensor([r[key] for r in rows], dtype=torch.float64) for key in rows[0]}


def test_exact_path_matches_brute_force():
    logp, logq = _rows(0, torch.float32)
    got, ref = overlap_exact(logp, logq, K), _brute_rows(logp, logq, K)
    assert set(got) == set(ref)
    # the fixture spans empty, partial and full overlaps, so every branch is exercised
    assert ref["ratio"].min() == 0.0 and ref["ratio"].max() == 1.0 and ((ref["ratio"] > 0) & (ref["ratio"] < 1)).any()
    for key in ref:
        torch.testing.assert_close(got[key].double(), ref[key], atol=1e-5, rtol=0, equal_nan=True, msg=key)
    assert (got["advantage"][~got["advantage"].isnan()] <= 1e-6).all()  # −KL(p̄‖q̄)


def test_topk_path_matches_brute_force_in_any_slot_order():
    logp, logq = _rows(1)
    ref = _brute_rows(logp, logq, K)
    rng = random.Random(1)
    lists = {"p": ([], []), "q": ([], [])}
    for side, rows in (("p", logp.tolist()), ("q", logq.tolist())):
        for row in rows:
            ids = _top(row, K)
            rng.shuffle(ids)  # the lists need not be sorted
            lists[side][0].append(ids)
            lists[side][1].append([row[v] for v in ids])
    p_idx, p_lp = torch.tensor(lists["p"][0]), torch.tensor(lists["p"][1], dtype=torch.float64)
    q_idx, q_lq = torch.tensor(lists["q"][0]), torch.tensor(lists["q"][1], dtype=torch.float64)
    got = overlap_from_topk(p_idx, p_lp, q_idx, q_lq)
    assert 0 < ref["top1"].mean() < 1  # agreeing and disagreeing heads, from shuffled lists
    for key in ("ratio", "top1", "mass_student", "mass_teacher", "advantage"):
        torch.testing.assert_close(got[key], ref[key], atol=1e-12, rtol=0, equal_nan=True, msg=key)
    # entropies from the lists are lower bounds of the true ones
    assert (topk_entropy(p_lp) <= entropy(logp) + 1e-12).all() and (topk_entropy(q_lq) <= entropy(logq) + 1e-12).all()
    assert (topk_entropy(p_lp) < entropy(logp) - 1e-3).any()  # and strictly lower with a real tail


def test_topk_entropy_exact_when_support_within_top_k():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(8, V, generator=g, dtype=torch.float64)
    z[:, K - 2:] = float("-inf")  # support of K-2 tokens: the top-K list holds it all (plus two -inf slots)
    logp = z.log_softmax(-1)
    lp_K, _ = logp.topk(K, -1)
    ref = torch.tensor([-sum(math.exp(x) * x for x in row if x > -math.inf) for row in logp.tolist()],
                       dtype=torch.float64)
    torch.testing.assert_close(topk_entropy(lp_K), ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(entropy(logp), ref, atol=1e-12, rtol=0)


def test_topk_entropy_lumps_the_tail_into_one_symbol():
    lp = torch.tensor([[math.log(0.5), math.log(0.25), float("-inf")]], dtype=torch.float64)  # tail 0.25
    torch.testing.assert_close(topk_entropy(lp), torch.tensor([1.5 * math.log(2)], dtype=torch.float64))


def test_identical_distributions():
    logp, _ = _rows(3)
    out = overlap_exact(logp, logp.clone(), K)
    assert (out["ratio"] == 1).all()
    torch.testing.assert_close(out["mass_student"], out["mass_teacher"])
    torch.testing.assert_close(out["advantage"], torch.zeros(N, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(out["entropy_gap"], torch.zeros(N, dtype=torch.float64), atol=1e-12, rtol=0)


def test_disjoint_top_k_gives_nan_advantage_that_summarise_skips():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(2, V, generator=g, dtype=torch.float64)
    zq = z.clone()
    zq[0] = -z[0]  # row 0: teacher's top-K = student's bottom-K; row 1: identical
    logp, logq = z.log_softmax(-1), zq.log_softmax(-1)
    out = overlap_exact(logp, logq, K)
    assert out["ratio"].tolist() == [0.0, 1.0]
    assert out["mass_student"][0] == 0 and out["mass_teacher"][0] == 0
    assert math.isnan(out["advantage"][0]) and not math.isnan(out["advantage"][1])
    s = summarise(out, prefix="tok")
    assert set(s) == {f"tok_{k}" for k in ("ratio", "top1", "mass_student", "mass_teacher", "advantage",
                                          "entropy_gap")}
    assert s["tok_ratio"] == pytest.approx(0.5) and s["tok_top1"] == pytest.approx(0.5)
    assert s["tok_advantage"] == pytest.approx(out["advantage"][1].item(), abs=1e-12)  # NaN row skipped
    assert math.isnan(summarise({"advantage": out["advantage"][:1]})["advantage"])  # all NaN → NaN
    assert set(summarise(out)) == set(out)  # no prefix: bare keys


def test_padded_minus_inf_slots_never_count():
    g = torch.Generator().manual_seed(5)
    p_lp = torch.randn(3, V, generator=g, dtype=torch.float64).log_softmax(-1).topk(K, -1)
    q_lp = torch.randn(3, V, generator=g, dtype=torch.float64).log_softmax(-1)[:, :K].clone()
    q_lp[:, -2:] = float("-inf")
    out = overlap_from_topk(p_lp.indices, p_lp.values, p_lp.indices.clone(), q_lp)  # same ids on both sides
    torch.testing.assert_close(out["ratio"], torch.full((3,), (K - 2) / K, dtype=torch.float64))
    torch.testing.assert_close(out["mass_student"], p_lp.values[:, :K - 2].exp().sum(-1))
    torch.testing.assert_close(out["mass_teacher"], q_lp[:, :K - 2].exp().sum(-1))
    assert not out["advantage"].isnan().any()
    swapped = overlap_from_topk(p_lp.indices.clone(), q_lp, p_lp.indices, p_lp.values)  # -inf on the student side
    torch.testing.assert_close(swapped["ratio"], out["ratio"])
    torch.testing.assert_close(swapped["mass_student"], out["mass_teacher"])
    # the exact path with tiny supports: topk fills both lists with -inf columns, which must not match
    logp = torch.full((1, 8), float("-inf"), dtype=torch.float64)
    logq = torch.full((1, 11), float("-inf"), dtype=torch.float64)  # a padded teacher vocabulary
    logp[0, [0, 1]] = math.log(0.5)
    logq[0, [0, 2]] = math.log(0.5)
    out = overlap_exact(logp, logq, K)
    assert out["ratio"].item() == pytest.approx(1 / K)
    assert out["mass_student"].item() == pytest.approx(0.5) and out["mass_teacher"].item() == pytest.approx(0.5)
    assert out["advantage"].item() == pytest.approx(0.0)


def test_mismatched_list_shapes_raise():
    idx, lp = torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4)
    with pytest.raises(ValueError):
        overlap_from_topk(idx, lp, idx[:, :3], lp[:, :3])


def test_position_edges():
    assert position_edges(0) == [0, 1]
    assert position_edges(1) == [0, 1]
    assert position_edges(6) == [0, 1, 2, 4, 8]
    assert position_edges(8) == [0, 1, 2, 4, 8]
    assert position_edges(9) == [0, 1, 2, 4, 8, 16]


def test_by_position_hand_example():
    x = torch.tensor([[0.0, 1, 2, 3, 4, 5], [10, 11, 12, 13, float("nan"), 15]])
    mask = torch.tensor([[1, 0, 1, 1, 1, 0], [1, 0, 0, 1, 1, 0]])
    out = by_position(x, mask, position_edges(6), "adv")
    # [0,1): {0, 10}; [1,2): nothing masked in → omitted; [2,4): {2, 3, 13}; [4,8): {4} (the NaN is skipped)
    assert set(out) == {f"adv_pos{a}_{b}_{s}" for a, b in ((0, 0), (2, 3), (4, 7)) for s in ("mean", "min", "p10", "p50")}
    expected = {"adv_pos0_0_mean": 5.0, "adv_pos0_0_min": 0.0, "adv_pos0_0_p10": 1.0, "adv_pos0_0_p50": 5.0,
                "adv_pos2_3_mean": 6.0, "adv_pos2_3_min": 2.0, "adv_pos2_3_p10": 2.2, "adv_pos2_3_p50": 3.0,
                "adv_pos4_7_mean": 4.0, "adv_pos4_7_min": 4.0, "adv_pos4_7_p10": 4.0, "adv_pos4_7_p50": 4.0}
    assert out == pytest.approx(expected)


def test_masked_mean():
    assert masked_mean(torch.tensor([1.0, float("nan"), 3.0])) == pytest.approx(2.0)
    assert math.isnan(masked_mean(torch.tensor([float("nan")])))
    assert math.isnan(masked_mean(torch.tensor([])))
