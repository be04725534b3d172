"""learner.packing / teacher.packing: a micro-batch's real tokens packed into rows (several
sequences per row, position ids restarting) give the padded batch's log-probs, hidden states,
teacher scores, loss and gradients."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd_exp.config import schema_cfg
from opd_exp.core.types import Rollouts, StepBatch, TeacherScores
from opd_exp.engines.hf_policy import HFPolicy
from opd_exp.engines.packing import pack
from opd_exp.engines.teacher_hf import HFTeacher
from opd_exp.methods import make_objective

PROMPT_LEN = [12, 3, 5, 8, 2, 4]
RESPONSE_LEN = [30, 4, 2, 10, 6, 1]


def rollouts() -> Rollouts:
    """Left-padded prompts and right-padded responses of very different lengths, one trained
    position masked out in the middle of a response (special-token masking)."""
    g = torch.Generator().manual_seed(0)
    B, P, T = len(PROMPT_LEN), max(PROMPT_LEN), max(RESPONSE_LEN)
    pm, rm = torch.zeros(B, P), torch.zeros(B, T)
    for b in range(B):
        pm[b, P - PROMPT_LEN[b]:] = 1
        rm[b, :RESPONSE_LEN[b]] = 1
    rm[0, 5] = 0
    return Rollouts(prompt_ids_B_P=torch.randint(5, 500, (B, P), generator=g), prompt_mask_B_P=pm,
                    response_ids_B_T=torch.randint(5, 500, (B, T), generator=g), response_mask_B_T=rm,
                    group_B=torch.arange(B))


def test_pack_lays_real_tokens_end_to_end_with_restarting_positions():
    r = rollouts()
    p = pack(r)
    R, N = p.input_ids_R_N.shape
    assert N <= r.input_ids_B_L.shape[1] and R < len(PROMPT_LEN)  # narrower and fewer rows
    starts = (p.position_ids_R_N == 0).sum().item()
    assert starts > R  # several sequences share a row
    # every real token once: each prompt's and each response's up to its last trained position
    real = sum(PROMPT_LEN) + sum(RESPONSE_LEN)
    assert (p.input_ids_R_N != 0).sum().item() == real
    for b in range(len(PROMPT_LEN)):  # the state before response token t sits just before it
        t = torch.arange(RESPONSE_LEN[b])
        assert torch.equal(p.input_ids_R_N[p.row_B_T[b, t], p.col_B_T[b, t] + 1], r.response_ids_B_T[b, t])


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request, tiny_world):
    return AutoModelForCausalLM.from_pretrained(tiny_world / "student", attn_implementation=request.param)


def test_packed_logprobs_and_hidden_states_equal_the_padded_ones(model):
    r = rollouts()
    m = r.response_mask_B_T.bool()
    padded, packed = HFPolicy(model), HFPolicy(model, packing=True)
    assert (padded.token_logprobs(r, 0.7) - packed.token_logprobs(r, 0.7))[m].abs().max() <= 1e-5
    diff = padded.response_hidden(r)[m] - packed.response_hidden(r)[m]
    assert diff.abs().max() <= 1e-5


@pytest.mark.parametrize("objective", ["sampled_token", "full_vocab"])
def test_packed_loss_and_gradients_equal_the_padded_ones(model, objective):
    r = rollouts()
    cfg = schema_cfg({"objective": {"name": objective}})
    obj = make_objective(cfg.objective, cfg.reward, 1.0)
    teacher = copy.deepcopy(model)
    with torch.no_grad():  # another model, so the loss has a gradient
        for i, p in enumerate(teacher.parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    scores = (TeacherScores(logp_B_T=HFPolicy(teacher).token_logprobs(r).detach()) if objective == "sampled_token"
              else TeacherScores(hidden_B_T_H=HFPolicy(teacher).response_hidden(r).detach(),
                                 lm_head=teacher.get_output_embeddings()))
    out = {}
    for packing in (False, True):
        student = copy.deepcopy(model)
        view = HFPolicy(student, packing=packing)
        batch = StepBatch(r, scores)
        batch.logp_old_B_T = view.token_logprobs(r).detach()
        batch, _ = obj.prepare(batch)
        loss, _ = obj.loss(view, batch, float(r.response_mask_B_T.sum()))
        loss.backward()
        out[packing] = (loss.item(), {n: p.grad.clone() for n, p in student.named_parameters()})
    assert out[True][0] == pytest.approx(out[False][0], abs=1e-6)
    worst = max((out[True][1][n] - g).abs().max().item() for n, g in out[False][1].items())
    assert worst <= 1e-5 and max(g.abs().max().item() for g in out[False][1].values()) > 1e-3


def test_a_packed_run_trains_as_the_padded_one(tmp_path, use_tiny_world):
    import json

    from opd_exp.train import train

    from .conftest import TINY_RUN, compose

    recs = {}
    for packing in (False, True):  # the learner's and the HF teacher's forward
        train(compose(TINY_RUN + ["trainer.steps=2", "eval.every=0", f"learner.packing={packing}",
                                  f"teacher.packing={packing}", "rollout.max_new_tokens=24"]),
              tmp_path / str(packing))
        lines = (tmp_path / str(packing) / "metrics.jsonl").read_text().splitlines()
        recs[packing] = [json.loads(x) for x in lines if json.loads(x)["step"] > 0]
    for a, b in zip(recs[False], recs[True]):
        for key in ("train/loss", "train/grad_norm", "rollout/logprob_mismatch"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


def test_packing_is_refused_where_rows_would_attend_across_sequences(tiny_world):
    from opd_exp.config import ConfigError, validate

    m = AutoModelForCausalLM.from_pretrained(tiny_world / "student")
    m.config._attn_implementation = "flash_attention_2"  # needs a single packed row
    with pytest.raises(ConfigError, match="learner.packing=true is not allowed with attention 'flash_attention_2'"):
        HFPolicy(m, packing=True)
    with pytest.raises(ConfigError, match="teacher.packing=true is not allowed with attention"):
        HFTeacher(m, 4, 8, packing=True)
    with pytest.raises(ConfigError, match="learner.packing"):
        validate(schema_cfg({"learner": {"backend": "deepspeed", "zero_stage": 3, "packing": True}}))
    with pytest.raises(ConfigError, match="teacher.packing=True is not allowed: false unless teacher.backend=hf"):
        validate(schema_cfg({"teacher": {"backend": "vllm", "packing": True}}))


@pytest.mark.parametrize("needs", ["sampled", "topk", "hidden"])
def test_the_packed_hf_teacher_scores_as_the_padded_one(model, needs, monkeypatch):
    import opd_exp.engines.hf_policy as hf_policy

    r = rollouts()
    m = r.response_mask_B_T.bool()
    packed_calls = []
    monkeypatch.setattr(hf_policy, "pack", lambda rr: packed_calls.append(rr.size) or pack(rr))
    # micro-batches of 4 rows: the packed forward runs per micro-batch
    padded = HFTeacher(copy.deepcopy(model), 4, 8).score(r, needs, k=5)
    assert packed_calls == []
    packed = HFTeacher(copy.deepcopy(model), 4, 8, packing=True).score(r, needs, k=5)
    assert packed_calls == [4, 2]  # the teacher's forward really ran packed, per micro-batch
    pairs = {"sampled": [(padded.logp_B_T, packed.logp_B_T)],
             "topk": [(padded.topk_logq_B_T_K, packed.topk_logq_B_T_K), (padded.entropy_B_T, packed.entropy_B_T)],
             "hidden": [(padded.hidden_B_T_H, packed.hidden_B_T_H)]}[needs]
    for a, b in pairs:
        assert (a[m] - b[m]).abs().max() <= 1e-5
    if needs == "topk":  # the same support (no near-ties among these logits)
        assert torch.equal(padded.topk_idx_B_T_K[m], packed.topk_idx_B_T_K[m])


def test_a_model_that_post_processes_its_logits_is_refused_where_the_head_is_applied_alone():
    """Gemma 2 soft-caps its logits in its forward: packing, the fused objectives and the teacher's
    top-K / hidden scores apply the LM head's matmul alone and would give other log-probs (by up
    to ~8 nats here) — refused there; the unpacked sampled-token path runs the model's forward."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from opd_exp.config import ConfigError

    cfg = Gemma2Config(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                       final_logit_softcapping=2.0, attn_implementation="eager")
    gemma = Gemma2ForCausalLM(cfg).eval()
    r = rollouts()
    with pytest.raises(ConfigError, match=r"learner.packing=true is not allowed with .*final_logit_softcapping"):
        HFPolicy(gemma, packing=True)
    with pytest.raises(ConfigError, match="teacher.packing=true is not allowed"):
        HFTeacher(gemma, 4, 8, packing=True)
    view = HFPolicy(gemma)
    with pytest.raises(ConfigError, match="on the LM head alone"):
        view.response_hidden(r)
    with pytest.raises(ConfigError, match="on the LM head alone"):
        HFTeacher(gemma, 4, 8).score(r, "topk", 4)
    with torch.no_grad():  # the model's own forward: soft-capped log-probs
        logp = view.token_logprobs(r)
        logits = gemma(input_ids=r.input_ids_B_L, attention_mask=r.attention_mask_B_L,
                       position_ids=r.position_ids_B_L).logits[:, r.prompt_ids_B_P.shape[1] - 1:-1]
    want = torch.log_softmax(logits, -1).gather(-1, r.response_ids_B_T[..., None])[..., 0]
    m = r.response_mask_B_T.bool()
    assert (logp - want)[m].abs().max() <= 1e-5 and logits.abs().max() <= 2.0 + 1e-4
    plain = copy.deepcopy(gemma.config)
    plain.final_logit_softcapping = None
    HFPolicy(Gemma2ForCausalLM(plain), packing=True)  # nothing post-processed: allowed
