"""The fused top-K support loss (FusedSupportLoss, the teacher's support with renormalisation
under a plain LM head): the same loss and the same gradients for the hidden states and the LM
head as the dense reference — the support's logits from W[idx] h under ordinary autograd — in
every gradient form, with missing teacher entries, padded vocabulary rows and several chunks."""

import pytest
import torch

from opd_exp.config import schema_cfg
from opd_exp.methods.topk import TopKOPD

B, T, H, V, ROWS, K = 2, 11, 16, 40, 44, 6


def inputs():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    head = torch.nn.Linear(H, ROWS, bias=False).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(ROWS, H, generator=g, dtype=torch.float64) * 0.5)
    idx = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(B * T)]).view(B, T, K)
    logq = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64), -1).gather(-1, idx)
    logq[0, 2, 4:] = -float("inf")  # the teacher returned fewer than K here
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[1, 7:] = 0
    return h, head, idx, logq, mask


@pytest.mark.parametrize("gradient,weight", [("analytic", "student"), ("pg", "student"),
                                             ("pg", "teacher"), ("pg", "uniform")])
def test_fused_support_loss_equals_the_dense_reference(gradient, weight):
    cfg = schema_cfg({"objective": {"name": "topk", "k": K, "gradient": gradient, "weight": weight,
                                    "chunk_size": 4}})
    obj = TopKOPD(cfg.objective, cfg.reward, temperature=0.7)
    h, head, idx, logq, mask = inputs()

    h1 = h.clone().requires_grad_()
    total, support = obj.summed(head, None, h1, mask, (logq, idx), vocab=V)
    total.backward()
    got = (total.item(), h1.grad.clone(), head.weight.grad.clone(), support.item())

    head.weight.grad = None
    h2 = h.clone().requires_grad_()
    logits_S = (head.weight[idx] @ h2[..., None])[..., 0] / 0.7  # dense: a [V, H] scatter in backward
    ref, _ = obj._support_loss(logits_S, logq, torch.isfinite(logq), mask)
    ref.backward()
    assert got[0] == pytest.approx(ref.item(), rel=1e-12)
    assert torch.allclose(got[1], h2.grad, atol=1e-12) and torch.allclose(got[2], head.weight.grad, atol=1e-12)
    assert got[2][V:].abs().max() == 0  # padded rows: no gradient
    assert got[3] == (torch.isfinite(logq).sum(-1) * mask).sum().item()
    assert h2.grad.abs().max() > 1e-3


def test_bf16_inputs_sum_the_loss_in_float32():
    cfg = schema_cfg({"objective": {"name": "topk", "k": K, "chunk_size": 4}})
    obj = TopKOPD(cfg.objective, cfg.reward, temperature=1.0)
    h, head, idx, logq, mask = inputs()
    head = head.to(torch.bfloat16)
    h = h.to(torch.bfloat16).requires_grad_()
    total, _ = obj.summed(head, None, h, mask, (logq.float(), idx), vocab=V)
    assert total.dtype == torch.float32
    with torch.no_grad():
        ref, _ = obj.summed(head, None, h, mask, (logq.float(), idx), vocab=V)  # the unfused path
    assert total.item() == pytest.approx(ref.item(), rel=1e-5)
    total.backward()
    assert head.weight.grad.dtype == torch.bfloat16 and torch.isfinite(head.weight.grad).all()
    # the rows' gradient (summed in float32 per chunk) against a float64 run on the same bf16 values
    head64, h64 = head.double(), h.detach().double().requires_grad_()
    ref64, _ = obj.summed(head64, None, h64, mask, (logq.float(), idx), vocab=V)
    ref64.backward()
    scale = head64.weight.grad.abs().max()
    assert (head.weight.grad.double() - head64.weight.grad).abs().max() < 0.02 * scale
    assert (h.grad.double() - h64.grad).abs().max() < 0.02 * h64.grad.abs().max()
