"""ULD / GOLD-hybrid ablations (methods/uld.py) against loops written from their definitions."""

from __future__ import annotations

import math

import pytest
import torch

from opd_exp.methods.uld import uld_position_loss, uld_summed


def _reference(p: list[float], q: list[float], exact: list[int], hybrid: bool) -> float:
    K = len(q)
    if not hybrid:
        return sum(abs(a - b) for a, b in zip(sorted(p, reverse=True)[:K], sorted(q, reverse=True)))
    matched = [k for k in range(K) if exact[k] >= 0 and q[k] > 0]
    jsd = 0.0
    for k in matched:
        a, b = p[exact[k]], q[k]
        m = (a + b) / 2
        jsd += 0.5 * (a * math.log(a / m) if a > 0 else 0) + 0.5 * (b * math.log(b / m) if b > 0 else 0)
    ids = {exact[k] for k in matched}
    p_rest = sorted((x for i, x in enumerate(p) if i not in ids), reverse=True)[:K]
    q_rest = sorted([0.0 if k in matched else q[k] for k in range(K)], reverse=True)
    p_rest += [0.0] * (K - len(p_rest))
    l1 = sum(abs(a - b) for a, b in zip(p_rest, q_rest))
    w = len(matched) / K
    return w * jsd + (1 - w) * l1


@pytest.mark.parametrize("hybrid", [False, True])
def test_position_loss_matches_the_definition(hybrid):
    torch.manual_seed(0)
    N, V, K = 6, 12, 4
    logp = torch.log_softmax(torch.randn(N, V, dtype=torch.float64) * 2, -1)
    logq = torch.log_softmax(torch.randn(N, 20, dtype=torch.float64) * 2, -1).topk(K, -1).values
    logq[0, 3] = -torch.inf  # a teacher with fewer than K entries there
    exact = torch.randint(-1, V, (N, K))
    exact[1] = torch.tensor([3, 3, -1, 5])  # two teacher tokens with one student spelling
    got = uld_position_loss(logp, logq, exact, hybrid)
    for n in range(N):
        p, q = logp[n].exp().tolist(), [math.exp(x) if x > -math.inf else 0.0 for x in logq[n].tolist()]
        if n == 1 and hybrid:  # a duplicate student id: each matched entry against p of that id
            continue
        assert got[n].item() == pytest.approx(_reference(p, q, exact[n].tolist(), hybrid), abs=1e-9)


def test_summed_counts_only_positions_with_a_teacher_entry_and_has_gradients():
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 10, bias=False)
    h = torch.randn(2, 5, 8, requires_grad=True)
    mask = torch.ones(2, 5)
    logq = torch.full((2, 5, 3), -torch.inf)
    logq[0, 1] = torch.log(torch.tensor([0.5, 0.3, 0.1]))
    logq[1, 4] = torch.log(torch.tensor([0.6, 0.2, 0.1]))
    exact = torch.full((2, 5, 3), -1)
    total, n = uld_summed(head, h, mask, logq, exact, False, 1.0, None, chunk=1)
    assert n.item() == 2
    total.backward()
    assert h.grad[0, 1].abs().sum() > 0 and h.grad[0, 0].abs().sum() == 0
    direct = uld_position_loss(torch.log_softmax(head(h[[0, 1], [1, 4]]), -1), logq[[0, 1], [1, 4]],
                               exact[[0, 1], [1, 4]], False).sum()
    assert total.item() == pytest.approx(direct.item(), rel=1e-6)


def test_hybrid_with_student_id_0_matched_in_any_slot_order():
    """An unmatched entry (−1) must not write over a matched entry's student id 0."""
    logp = torch.log(torch.tensor([[0.5, 0.2, 0.2, 0.1]], dtype=torch.float64))
    q = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    exact = torch.tensor([0, -1, -1])
    values = set()
    for perm in ([0, 1, 2], [1, 0, 2], [2, 1, 0]):
        got = uld_position_loss(logp, q[perm].log()[None], exact[perm][None], True).item()
        assert got == pytest.approx(_reference([0.5, 0.2, 0.2, 0.1], q[perm].tolist(), exact[perm].tolist(), True))
        values.add(round(got, 12))
    assert len(values) == 1


def test_a_micro_batch_without_teacher_positions_still_has_a_graph():
    head = torch.nn.Linear(4, 6, bias=False)
    h = torch.randn(1, 3, 4, requires_grad=True)
    total, n = uld_summed(head, h, torch.ones(1, 3), torch.full((1, 3, 2), -torch.inf),
                          torch.full((1, 3, 2), -1), True, 1.0, None, chunk=2)
    assert n.item() == 0 and total.item() == 0.0
    total.backward()  # no error: the learner's backward works on such a micro-batch
    assert head.weight.grad is not None and (head.weight.grad == 0).all()
