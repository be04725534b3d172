"""`learner.gradient_checkpointing`: the same loss and gradients as without (≤ 1e-5), padded and
packed, through the learner's own set-up — and fewer activations kept for the backward (so the
flag is seen to act, not only to do no harm)."""

import copy

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from opd_exp.config import schema_cfg
from opd_exp.core.types import StepBatch, TeacherScores
from opd_exp.engines.hf_policy import HFPolicy
from opd_exp.engines.learner_torch import prepare_for_training
from opd_exp.methods import make_objective

from .test_packing import rollouts


def small_qwen3(seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                      max_position_embeddings=128, tie_word_embeddings=True)
    return Qwen3ForCausalLM(cfg)


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for the backward while `fn` runs."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


@pytest.mark.parametrize("packing", [False, True])
def test_checkpointed_loss_and_gradients_equal_the_plain_ones(packing):
    r = rollouts()
    base = small_qwen3()
    teacher = small_qwen3(seed=1)
    scores = TeacherScores(logp_B_T=HFPolicy(teacher).token_logprobs(r).detach())
    cfg = schema_cfg({"objective": {"name": "sampled_token"}})
    obj = make_objective(cfg.objective, cfg.reward, 1.0)
    out = {}
    for ckpt in (False, True):
        student = copy.deepcopy(base)
        lc = schema_cfg({"learner": {"gradient_checkpointing": ckpt, "packing": packing}}).learner
        prepare_for_training(student, lc)
        view = HFPolicy(student, packing=packing)
        batch = StepBatch(r, scores)
        batch.logp_old_B_T = view.token_logprobs(r).detach()
        batch, _ = obj.prepare(batch)
        (loss, _), kept = saved_bytes(lambda: obj.loss(view, batch, float(r.response_mask_B_T.sum())))
        loss.backward()
        out[ckpt] = (loss.item(), {n: p.grad.clone() for n, p in student.named_parameters()}, kept)
    assert out[True][0] == pytest.approx(out[False][0], abs=1e-6)
    worst = max((out[True][1][n] - g).abs().max().item() for n, g in out[False][1].items())
    assert worst <= 1e-5 and max(g.abs().max().item() for g in out[False][1].values()) > 1e-3
    assert out[True][2] < 0.6 * out[False][2]  # the layers' activations were not kept


def test_a_model_without_checkpointing_support_is_refused_naming_the_field():
    lc = schema_cfg({"learner": {"gradient_checkpointing": True}}).learner
    with pytest.raises(ValueError, match="learner.gradient_checkpointing"):
        prepare_for_training(torch.nn.Linear(2, 2), lc)
