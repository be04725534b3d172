"""HF rollouts sample exactly the configured policy, and report its log-probs without [B, T, V]."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd_exp.core.types import Sampling
from opd_exp.engines.hf_policy import token_logprobs
from opd_exp.engines.rollout_hf import HFRollout

PROMPTS = [[5, 6, 7, 8], [9, 10]]


def _setup(world, **gen):
    tok = AutoTokenizer.from_pretrained(world / "student")
    model = AutoModelForCausalLM.from_pretrained(world / "student")
    for k, v in gen.items():  # what a hub model's generation_config.json may ship
        setattr(model.generation_config, k, v)
    return model, tok, HFRollout(model, tok, {tok.eos_token_id})


def test_model_generation_defaults_never_change_the_sampling_policy(tiny_world):
    """A shipped `no_repeat_ngram_size` / `repetition_penalty` must not leak into sampling: the
    tiny student repeats tokens freely when sampled from its own distribution."""
    model, tok, hf = _setup(tiny_world, no_repeat_ngram_size=1, repetition_penalty=50.0,
                            top_k=1, temperature=0.01)
    torch.manual_seed(0)
    r = hf.generate(PROMPTS, Sampling(n=16, max_new_tokens=16))
    repeats = 0
    for b in range(r.size):
        n = int(r.response_mask_B_T[b].sum())
        toks = r.response_ids_B_T[b, :n].tolist() + r.prompt_ids_B_P[b][r.prompt_mask_B_P[b].bool()].tolist()
        repeats += len(toks) - len(set(toks))
    assert repeats > 0
    assert len({tuple(x) for x in r.response_ids_B_T.tolist()}) > 1  # not greedy (top_k=1)
    assert model.generation_config.no_repeat_ngram_size == 1  # the model's own is restored


def test_logprobs_are_the_untruncated_tempered_policy_and_warpers_apply(tiny_world):
    model, tok, hf = _setup(tiny_world)
    s = Sampling(n=8, temperature=1.3, top_k=5, top_p=0.9, max_new_tokens=12)
    torch.manual_seed(1)
    r = hf.generate(PROMPTS, s)
    mask = r.response_mask_B_T
    with torch.no_grad():
        ref = token_logprobs(model, r, s.temperature)
        logits = model(input_ids=r.input_ids_B_L, attention_mask=r.attention_mask_B_L,
                       position_ids=r.position_ids_B_L).logits[:, r.prompt_ids_B_P.shape[1] - 1:-1]
    assert ((r.logp_B_T - ref).abs() * mask).max().item() < 1e-4
    rank = (logits > logits.gather(-1, r.response_ids_B_T[..., None])).sum(-1)
    assert (rank[mask.bool()] < 5).all()  # top-k = 5 was applied to what was sampled


def test_generate_never_asks_for_the_full_logits(tiny_world, monkeypatch):
    model, tok, hf = _setup(tiny_world)
    seen = {}
    real = model.generate

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)

    monkeypatch.setattr(model, "generate", spy)
    r = hf.generate(PROMPTS, Sampling(n=2, max_new_tokens=6))
    assert r.logp_B_T is not None and seen
    assert not seen.get("output_logits") and not seen.get("output_scores")
