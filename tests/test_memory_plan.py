"""`python -m opd_exp plan`: the per-GPU memory plan (opd_exp/runtime/memory_plan.py).

- parameter counts exact against HF's own models (Qwen3 and Qwen2 layouts, tied and untied, and
  every shipped reference shape built on the meta device);
- weights / gradients / optimizer states exact against what the torch learner really holds after
  a step, on the toy student and a mid-size random Qwen3;
- activations within ±25 % of the bytes autograd really keeps for one micro-batch's backward
  (the learner's own loss path), random Qwen3 models from toy size to ~0.5B, with and without
  gradient checkpointing; and activations + head + gradients within ±25 % of the peak RSS of a
  forward + backward in a fresh process;
- every shipped real experiment fits an 80 GB GPU with ≥ 10 % headroom; an oversized run is
  refused in one line by `train` before any weight is loaded.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config

from opd_exp.config import schema_cfg
from opd_exp.core.types import StepBatch, TeacherScores
from opd_exp.engines.hf_policy import HFPolicy
from opd_exp.engines.learner_torch import TorchLearner
from opd_exp.methods import make_objective
from opd_exp.runtime.memory_plan import (REFERENCE_SHAPES, Shape, activation_parts, learner_state,
                                         make_plan, shape_from_config)

from .conftest import compose
from .test_gradient_checkpointing import saved_bytes
from .test_packing import rollouts

ROOT = Path(__file__).resolve().parent.parent
REAL = ["powerOPD_qwen3", "rethinking_qwen3", "rethinking_r1distill", "geometry_qwen3", "lsm_qwen25"]


def qwen(kind="qwen3", H=64, I=160, L=2, heads=2, kv=1, hd=32, V=512, tied=True, dtype=torch.float32):
    torch.manual_seed(0)
    Cfg = Qwen3Config if kind == "qwen3" else Qwen2Config
    kw = {"head_dim": hd} if kind == "qwen3" else {}
    c = Cfg(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L,
            num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied,
            max_position_embeddings=4096, **kw)
    return AutoModelForCausalLM.from_config(c, dtype=dtype)


@pytest.mark.parametrize("kind,tied", [("qwen3", True), ("qwen3", False), ("qwen2", True), ("qwen2", False)])
def test_parameter_count_is_hfs(kind, tied):
    m = qwen(kind, H=96, I=200, L=3, heads=3, kv=1, tied=tied)
    assert shape_from_config("x", m.config.to_dict()).params == m.num_parameters()


@pytest.mark.parametrize("name", sorted(REFERENCE_SHAPES))
def test_every_reference_shape_counts_as_hf_builds_it(name):
    s = REFERENCE_SHAPES[name]
    Cfg = Qwen3Config if s.qk_norm else Qwen2Config
    kw = {"head_dim": s.head_dim} if s.qk_norm else {}
    c = Cfg(vocab_size=s.vocab_rows, hidden_size=s.hidden, intermediate_size=s.intermediate,
            num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
            tie_word_embeddings=s.tied, **kw)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(c)
    assert s.params == m.num_parameters()


def torch_learner_bytes(model) -> dict[str, int]:
    """What the torch learner holds after a step: weights, gradients (after backward, before
    they are freed) and AdamW's two moments."""
    r = rollouts()
    cfg = schema_cfg({"learner": {"micro_batch_size": 64}})
    learner = TorchLearner(model, cfg.learner)
    obj = make_objective(cfg.objective, cfg.reward, 1.0)
    batch = StepBatch(r, TeacherScores(logp_B_T=torch.zeros(r.response_ids_B_T.shape)))
    batch.logp_old_B_T = learner.logprobs(batch, 1.0)
    batch, _ = obj.prepare(batch)
    loss, _ = obj.loss(learner.view, batch, float(r.response_mask_B_T.sum()))
    loss.backward()
    params = list(model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params)
    learner.optimizer.step()
    moments = sum(t.numel() * t.element_size() for st in learner.optimizer.state.values()
                  for k, t in st.items() if k in ("exp_avg", "exp_avg_sq"))
    weights = sum(p.numel() * p.element_size() for p in params)
    return {"student weights": weights, "student gradients": grads, "optimizer (AdamW)": moments}


@pytest.mark.parametrize("which", ["toy", "mid"])
def test_weights_gradients_and_optimizer_are_exact_for_the_torch_learner(which, tiny_world):
    model = (AutoModelForCausalLM.from_pretrained(tiny_world / "student") if which == "toy"
             else qwen(H=512, I=1536, L=4, heads=8, kv=4, hd=64, V=8192, tied=False))  # ~30M
    shape = shape_from_config("m", model.config.to_dict())
    want = learner_state(schema_cfg({}), shape, 1)
    got = torch_learner_bytes(model)
    assert got == want


def measured_activations(model, tokens_per_row: int, rows: int, checkpointing: bool) -> int:
    """Bytes autograd keeps (parameters excluded) over one micro-batch's loss forward, through
    the learner's own path (HFPolicy, head alone), with random rollouts of full length."""
    from opd_exp.core.types import Rollouts

    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    g = torch.Generator().manual_seed(0)
    P = tokens_per_row // 4
    T = tokens_per_row - P
    V = model.config.vocab_size
    r = Rollouts(prompt_ids_B_P=torch.randint(0, V, (rows, P), generator=g),
                 prompt_mask_B_P=torch.ones(rows, P), response_ids_B_T=torch.randint(0, V, (rows, T), generator=g),
                 response_mask_B_T=torch.ones(rows, T), group_B=torch.arange(rows))
    view = HFPolicy(model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        view.token_logprobs(r).sum()
    return sum(seen.values())


SIZES = {  # name: (H, I, layers, heads, kv heads, head_dim, vocab)
    "toy": (64, 160, 2, 2, 1, 32, 577),
    "small": (512, 1536, 4, 8, 4, 64, 8192),
    "0.5B": (1024, 3072, 28, 16, 8, 128, 151936),  # Qwen3-0.6B's shape
}


CASES = [("toy", "qwen3", "float32"), ("small", "qwen3", "float32"), ("0.5B", "qwen3", "float32"),
         ("small", "qwen3", "bfloat16"), ("small", "qwen2", "float32"), ("small", "qwen2", "bfloat16")]


@pytest.mark.slow
@pytest.mark.parametrize("size,kind,dtype", CASES)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activations_within_a_quarter_of_what_autograd_keeps(size, kind, dtype, checkpointing):
    """Seen: Qwen3 0.96–1.00 of the measured bytes without checkpointing, 0.84–0.98 with it;
    Qwen2 (no q/k norms, the Qwen3 layer's coefficients) 1.13–1.18 without checkpointing, on the
    safe side, 0.89–0.91 with it."""
    H, I, L, heads, kv, hd, V = SIZES[size]
    model = qwen(kind, H=H, I=I, L=L, heads=heads, kv=kv, hd=hd, V=V, tied=True, dtype=getattr(torch, dtype))
    rows, per_row = 2, 96
    got = measured_activations(model, per_row, rows, checkpointing)
    cfg = schema_cfg({"learner": {"micro_batch_size": rows, "gradient_checkpointing": checkpointing},
                      "pair": {"student": {"dtype": dtype}},
                      "rollout": {"max_new_tokens": per_row - per_row // 4},
                      "plan": {"prompt_tokens": per_row // 4}})
    kept, recompute = activation_parts(cfg, shape_from_config(size, model.config.to_dict()))
    assert 0.75 * got <= kept <= 1.25 * got, (kept, got)
    assert (recompute > 0) == checkpointing


@pytest.mark.parametrize("name", REAL)
def test_every_real_experiment_fits_an_80gb_gpu_with_ten_percent_headroom(name):
    plan = make_plan(compose([f"+experiment={name}"]), gpu_gib=79.1)
    assert plan.fits and plan.headroom >= 0.10, plan.table()


def test_the_plan_grows_where_it_should():
    """ZeRO stages, checkpointing, the whole forward's logits and a sleeping engine move the
    items the way the ZeRO paper and the code paths say."""
    base = ["+experiment=powerOPD_qwen3"]
    p = {o: make_plan(compose(base + list(o)), gpu_gib=79.1) for o in [
        (), ("learner.zero_stage=1",), ("learner.zero_stage=3", "objective=sampled_token"),
        ("learner.gradient_checkpointing=false",), ("rollout.sleep=true",)]}
    plain = p[()]
    assert p[("learner.zero_stage=1",)].items["student gradients"] == pytest.approx(
        8 * plain.items["student gradients"])
    z3 = p[("learner.zero_stage=3", "objective=sampled_token")]
    assert z3.items["student weights"] == pytest.approx(plain.items["student weights"] / 8)
    assert z3.items["LM head (logits or chunks)"] > 10 * plain.items["LM head (logits or chunks)"]
    assert p[("learner.gradient_checkpointing=false",)].items["activations (one micro-batch)"] > \
        5 * plain.items["activations (one micro-batch)"]
    asleep = p[("rollout.sleep=true",)]
    assert "vLLM engine (rollouts)" not in asleep.phases["training"] and asleep.peak_gib < plain.peak_gib


def test_an_oversized_run_is_refused_in_one_line_before_any_weight_is_loaded(tmp_path):
    """The 8B bf16 student's optimizer on one GPU (ZeRO over one rank) cannot fit: `train`
    refuses it at start — no hub model is needed, none is downloaded."""
    p = subprocess.run([sys.executable, "-m", "opd_exp", "train", "+experiment=geometry_qwen3",
                        "launcher.nproc_per_node=1", "plan.gpu_memory_gib=79.1", "logger.mode=disabled",
                        f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, cwd=ROOT,
                       timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: memory plan: ")
    assert "optimizer (AdamW)" in lines[0] and "learner.zero_stage" in lines[0]
    assert "GiB per GPU at the peak" in lines[0]


def test_plan_command_prints_the_table_and_exits_by_the_verdict(tmp_path):
    def plan(*args):
        return subprocess.run([sys.executable, "-m", "opd_exp", "plan", *args, f"hydra.run.dir={tmp_path}"],
                              capture_output=True, text=True, cwd=ROOT, timeout=300)

    ok = plan("+experiment=lsm_qwen25")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "| teacher prompt_logprobs temporary |" in ok.stdout and "fits: " in ok.stdout
    assert (tmp_path / "plan.md").is_file()
    bad = plan("+experiment=lsm_qwen25", "teacher.max_num_batched_tokens=0", "learner.gradient_checkpointing=false")
    assert bad.returncode == 1 and "memory plan: " in bad.stdout.splitlines()[-1]


def test_engine_too_small_for_its_weights_is_a_problem_whatever_the_total():
    cfg = compose(["+experiment=geometry_qwen3", "rollout.gpu_memory_utilization=0.1"])
    plan = make_plan(cfg, gpu_gib=79.1)
    assert not plan.fits and "rollout.gpu_memory_utilization" in plan.refusal()


def test_shape_is_read_from_a_local_config_before_the_table(tiny_world, monkeypatch):
    monkeypatch.setenv("OPD_EXP_TOY_DIR", str(tiny_world))
    from opd_exp.runtime.memory_plan import find_shape

    s = find_shape("toy:student")
    m = AutoModelForCausalLM.from_pretrained(tiny_world / "student")
    assert isinstance(s, Shape) and s.params == m.num_parameters()
    with pytest.raises(ValueError, match="no config.json"):
        find_shape("nobody/NoSuchModel-1B")
    assert copy.copy(REFERENCE_SHAPES["Qwen/Qwen3-8B"]).params == pytest.approx(8.19e9, rel=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", ["0", "1"])
def test_activations_gradients_and_head_within_a_quarter_of_the_peak_rss(checkpointing):
    """One micro-batch's forward + backward in a fresh process: the peak RSS above the resident
    model against the plan's activations + LM-head chunks + gradients. Seen: 0.99 (no
    checkpointing), 1.00 (checkpointing): the sampled-token head's one 2²⁵-logit chunk, which a
    checkpointed layer's recompute outlasts (before: 0.89 and 1.08, a head of 256 positions)."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
    p = subprocess.run([sys.executable, "-m", "tests.engines.rss_probe", checkpointing], capture_output=True,
                       text=True, cwd=ROOT, timeout=600,
                       env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"})
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert 0.75 <= out["ratio"] <= 1.25, out
