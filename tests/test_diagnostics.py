"""Diagnostics in a run (SPEC §4): token metrics against full-vocabulary enumeration, diagnostics
that change nothing the run trains on, offline `diagnose` = the online numbers, subspace-
constrained gradients, resume of a constrained run, and the config checks."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd_exp.commands.diagnose import run_diagnose
from opd_exp.config import ConfigError, validate
from opd_exp.core.types import Sampling, StepBatch
from opd_exp.diagnostics.tokens import overlap_exact
from opd_exp.engines.hf_models import load_model, load_tokenizer, stop_token_ids
from opd_exp.engines.hf_policy import HFPolicy
from opd_exp.engines.rollout_hf import HFRollout
from opd_exp.engines.teacher_hf import HFTeacher
from opd_exp.loop.diagnose import token_metrics
from opd_exp.loop.geometry import SubspaceConstraint, block_matrices, cpu_copy, rest_matrices
from opd_exp.train import train

from .conftest import TINY_RUN, compose


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _model(path):
    return AutoModelForCausalLM.from_pretrained(path)


def _full_logp(model, r):
    """log softmax of every next-token distribution at the response positions, straight from
    the model's full logits: [B, T, V]."""
    logits = model(input_ids=r.input_ids_B_L, attention_mask=r.attention_mask_B_L,
                   position_ids=r.position_ids_B_L).logits
    return torch.log_softmax(logits[:, r.prompt_ids_B_P.shape[1] - 1:-1].double(), -1)


@torch.no_grad()
def test_token_metrics_match_full_vocabulary_enumeration(use_tiny_world):
    cfg = compose(TINY_RUN + ["diag.k=5", "rollout.max_new_tokens=10", "learner.micro_batch_size=2",
                              "objective.chunk_size=3"])
    tok = load_tokenizer(cfg.pair.student, "s")
    student, teacher_model = load_model(cfg.pair.student, "s"), load_model(cfg.pair.teacher, "t")
    torch.manual_seed(0)
    sampler = HFRollout(student, tok, stop_token_ids(cfg.pair.student, tok))
    r = sampler.generate([tok.encode("add 3 and 4"), tok.encode("12 plus 9")], Sampling(n=3, max_new_tokens=10))
    teacher = HFTeacher(teacher_model, 2, 3)
    batch = StepBatch(r, teacher.score(r, "sampled"))
    got = token_metrics(batch, HFPolicy(student), teacher, r, cfg)

    on = r.response_mask_B_T > 0
    lp, lq = _full_logp(student, r)[on], _full_logp(teacher_model, r)[on]
    ref = overlap_exact(lp, lq, 5)
    for key in ("ratio", "mass_student", "mass_teacher", "entropy_gap"):
        assert got[f"diag/token/{key}"] == pytest.approx(ref[key].mean().item(), abs=1e-5), key
    adv = ref["advantage"][~ref["advantage"].isnan()].mean().item()
    assert got["diag/token/advantage"] == pytest.approx(adv, abs=1e-5)
    assert got["diag/token/teacher_entropy_exact"] == 1.0
    y = r.response_ids_B_T[on]
    log_ratio = (lq.gather(-1, y[:, None]) - lp.gather(-1, y[:, None]))[:, 0]
    first = r.response_mask_B_T[:, 0] > 0  # position 0 of each row: bucket pos0_0
    assert got["diag/token/log_ratio_pos0_0_min"] == pytest.approx(
        (_full_logp(teacher_model, r)[:, 0] - _full_logp(student, r)[:, 0]).gather(
            -1, r.response_ids_B_T[:, :1])[first].min().item(), abs=1e-4)
    assert min(v for k, v in got.items() if k.startswith("diag/token/log_ratio_pos") and k.endswith("_min")
               and not math.isnan(v)) == pytest.approx(log_ratio.min().item(), abs=1e-4)


def test_diagnostics_change_nothing_and_offline_equals_online(tmp_path, use_tiny_world):
    """Token and parameter diagnostics every step / 2 steps: the same losses, gradient norms and
    final weights as a run without; `diagnose RUN_DIR` over the checkpoints gives the online
    diag/param/* numbers; Sim_K(end, end) = 1."""
    base = TINY_RUN + ["eval.every=0", "trainer.steps=4", "trainer.save_every=2", "trainer.keep_last=5",
                       "diag.grad_sequences=4"]
    train(compose(base), tmp_path / "plain")
    train(compose(base + ["diag.every=1", "diag.param_every=2", "logger.plots=true"]), tmp_path / "diag")
    assert all((tmp_path / "diag" / f).stat().st_size > 0 for f in ("diag_tokens.png", "diag_params.png"))
    a, b = _records(tmp_path / "plain"), _records(tmp_path / "diag")
    for key in ("train/loss", "train/grad_norm", "rollout/response_len"):
        assert [r.get(key) for r in a] == [r.get(key) for r in b], key
    pa, pb = (_model(tmp_path / d / "checkpoints/step_000004/student") for d in ("plain", "diag"))
    assert all(torch.equal(x, y) for x, y in zip(pa.parameters(), pb.parameters()))

    steps = {r["step"]: r for r in b}
    for s in (1, 2, 3, 4):
        assert 0 <= steps[s]["diag/token/ratio"] <= 1 and "diag/token/grad_var" in steps[s]
        assert any(k.startswith("diag/token/grad_norm_pos") for k in steps[s])
    assert "diag/param/all/sparsity" in steps[2] and "diag/param/all/sparsity" not in steps[3]
    assert "diag/param/all/locking_prev" in steps[4]
    locking = json.loads((tmp_path / "diag/diag/locking.json").read_text())
    assert set(locking) == {"2", "4"} and locking["4"] == pytest.approx(1.0, abs=1e-3)

    offline = run_diagnose(tmp_path / "diag")
    for s in (2, 4):
        online = {k: v for k, v in steps[s].items() if k.startswith("diag/param/") and "locking" not in k}
        assert online and all(offline[s][k] == pytest.approx(v, rel=1e-6, abs=1e-9, nan_ok=True)
                              for k, v in online.items())


def test_subspace_constraint_keeps_gradients_in_the_span(use_tiny_world):
    cfg = compose(TINY_RUN)
    model = load_model(cfg.pair.student, "s")
    mats = block_matrices(model)
    torch.manual_seed(0)
    bases = {n: torch.linalg.qr(torch.randn(w.shape[1], 3))[0] for n, w in mats.items()}
    SubspaceConstraint(t0=1, k=3).attach(model, bases)
    ids = torch.randint(0, 50, (2, 7))
    model(input_ids=ids, labels=ids).loss.backward()
    for n, w in mats.items():
        v = bases[n]
        assert w.grad is not None and w.grad.abs().sum() > 0
        assert (w.grad - w.grad @ v @ v.T).abs().max() < 1e-5, n  # rows inside span(V)
    assert model.get_input_embeddings().weight.grad is not None  # embeddings: not constrained


def test_constraint_attached_twice_projects_once_and_keeps_its_t0(use_tiny_world, tmp_path):
    """A resumed run re-attaches its saved bases: the hooks are replaced, never stacked, and the
    saved t0 wins over one recomputed from a changed trainer.steps."""
    model = load_model(compose(TINY_RUN).pair.student, "s")
    mats = block_matrices(model)
    torch.manual_seed(0)
    first = {n: torch.linalg.qr(torch.randn(w.shape[1], 3))[0] for n, w in mats.items()}
    second = {n: torch.linalg.qr(torch.randn(w.shape[1], 3))[0] for n, w in mats.items()}
    c = SubspaceConstraint(t0=2, k=3)
    assert not c.due(1) and c.due(2)
    c.attach(model, first)
    c.save(tmp_path)
    c.attach(model, second)
    ids = torch.randint(0, 50, (2, 7))
    model(input_ids=ids, labels=ids).loss.backward()
    for n, w in mats.items():
        v = second[n]
        assert (w.grad - w.grad @ v @ v.T).abs().max() < 1e-5  # in span(second) alone
    resumed = SubspaceConstraint(t0=5, k=3)  # trainer.steps changed on the resume
    resumed.load(tmp_path, model)
    assert resumed.t0 == 2 and not resumed.due(7)  # it has its bases: never started again


def test_probe_verdict_stops_at_a_failed_check():
    from opd_exp.commands.probe import verdict

    report = {"checks": [{"check": "vocabulary", "status": "fail", "detail": "tokenizers differ"},
                         {"check": "stop tokens", "status": "warn", "detail": "…"}], "measured": {}}
    assert verdict(report, compose([]).probe) == ("no-go", ["vocabulary: tokenizers differ"])
    nan = float("nan")
    report = {"checks": [], "measured": {"overlap_mass_teacher": 0.99, "early_overlap_mass_teacher": 0.99,
                                         "teacher_pass_rate": 0.8, "student_pass_rate": 0.2,
                                         "logprob_mismatch": nan}}
    v, reasons = verdict(report, compose([]).probe)
    assert v == "caution" and "no log-probs" in reasons[0]


def test_constrained_run_resumes_exactly_and_constrains_after_t0(tmp_path, use_tiny_world):
    """learner.subspace_constraint from step 1 of 4: 4 steps straight == 2 + resumed 2 (the bases
    come back from the checkpoint), and the run differs from an unconstrained one."""
    base = TINY_RUN + ["eval.every=0", "trainer.save_every=2", "learner.subspace_constraint=true",
                       "learner.subspace_from=0.25", "learner.subspace_k=2"]
    train(compose(base + ["trainer.steps=4"]), tmp_path / "straight")
    train(compose(base + ["trainer.steps=2"]), tmp_path / "resumed")
    train(compose(base + ["trainer.steps=4", "trainer.resume=true"]), tmp_path / "resumed")
    train(compose(base + ["trainer.steps=4", "learner.subspace_constraint=false"]), tmp_path / "free")
    assert (tmp_path / "straight/checkpoints/step_000002/subspace_bases.pt").exists()
    s, r, f = (_model(tmp_path / d / "checkpoints/step_000004/student") for d in ("straight", "resumed", "free"))
    assert all(torch.equal(x, y) for x, y in zip(s.parameters(), r.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(s.parameters(), f.parameters()))
    drop = lambda rec: {k: v for k, v in rec.items() if not k.endswith("seconds")}  # noqa: E731
    assert [drop(x) for x in _records(tmp_path / "straight")] == [drop(x) for x in _records(tmp_path / "resumed")]


@pytest.mark.parametrize("override,field", [
    ("diag.k=0", "diag.k"), ("diag.every=-1", "diag.every"), ("diag.eta=0", "diag.eta"),
    ("learner.subspace_from=1.0", "learner.subspace_from"), ("probe.prompts=0", "probe.prompts"),
])
def test_bad_diag_settings_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate(compose([override]))


def test_subspace_constraint_refused_under_zero3():
    with pytest.raises(ConfigError, match=r"learner\.subspace_constraint"):
        validate(compose(["learner=deepspeed", "learner.zero_stage=3", "learner.subspace_constraint=true"]))
    with pytest.raises(ConfigError, match=r"diag\.every"):
        validate(compose(["learner=deepspeed", "learner.zero_stage=3", "rollout=vllm", "diag.every=1"]))


@pytest.mark.slow
@pytest.mark.parametrize("pair,prompts,verdict,reason", [
    ("toy", 64, "go", None),
    ("toy_foreign", 64, "no-go", "thinking patterns look incompatible"),
    ("toy_same_data", 256, "no-go", "the teacher offers little"),  # the narrow margin: full size
])
def test_probe_verdicts_on_the_toy_conditions(tmp_path, pair, prompts, verdict, reason):
    """The shipped toy world (docs/diagnostics.md: the calibration): the standard pair passes, the
    foreign-pattern teacher and the no-new-capability teacher are flagged for their reason."""
    from opd_exp.commands.probe import run_probe

    report = run_probe(compose([f"pair={pair}", f"probe.prompts={prompts}"]), tmp_path)
    assert report["verdict"] == verdict, report["reasons"]
    assert all(c["status"] == "ok" for c in report["checks"])
    if reason:
        assert any(r.startswith(reason) for r in report["reasons"]), report["reasons"]
    assert json.loads((tmp_path / "probe.json").read_text())["verdict"] == verdict


def _adam_step(model, seed: int, weight_decay: float = 0.1):
    """One AdamW step of a language-model loss on random tokens (float64 weights)."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=weight_decay)
    ids = torch.randint(0, 50, (2, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()


def test_update_projection_keeps_the_whole_step_in_the_span(use_tiny_world):
    """learner.subspace_project=update: AdamW's step with weight decay, projected after it, has
    ≤ 1e-6 of its norm outside span(V_K) (float64 weights); the gradient projection leaves much
    more (AdamW rescales each coordinate), and says so; rest=freeze puts the rest back."""
    cfg = compose(TINY_RUN)
    outside = {}
    for project, rest in (("gradient", "train"), ("update", "train"), ("update", "freeze"),
                          ("update", "constrain")):
        model = load_model(cfg.pair.student, "s").double()
        mats = block_matrices(model)
        emb = rest_matrices(model)
        torch.manual_seed(0)
        bases = {n: torch.linalg.qr(torch.randn(w.shape[1], 3, dtype=torch.float64))[0].float()
                 for n, w in {**mats, **emb}.items()}
        c = SubspaceConstraint(t0=1, k=3, project=project, rest=rest, measure_every=1,
                               rest_start=cpu_copy(emb))
        c.attach(model, bases)
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        c.before_update(1, model)
        _adam_step(model, seed=1)
        m = c.after_update(model)
        outside[project, rest] = m["diag/param/outside_span"]
        out_sq = all_sq = 0.0
        for n, p in model.named_parameters():
            step_ = p.detach() - start[n]
            if n in mats:
                v = bases[n].double()
                out_sq += (step_ - step_ @ v @ v.T).square().sum().item()
                all_sq += step_.square().sum().item()
            elif rest == "constrain" and n in emb:  # the embeddings' step: inside their span
                v = bases[n].double()
                assert (step_ - step_ @ v @ v.T).norm() <= 1e-6 * step_.norm(), n
                assert step_.abs().max() > 0, n
            elif rest != "train":
                assert torch.equal(p, start[n]), n  # embeddings (freeze), norms: untouched
            else:
                assert step_.abs().max() > 0, n
        share = (out_sq / all_sq) ** 0.5  # the step's norm outside span(V_K), as applied
        if project == "update":
            assert share <= 1e-6 and m["diag/param/outside_span"] <= 1e-6
            assert m["diag/param/outside_span_proposed"] > 0.5  # what AdamW alone would have done
        else:
            assert m["diag/param/outside_span"] == pytest.approx(share, rel=1e-4)
    assert outside["gradient", "train"] > 0.1  # the leak the update projection closes


def test_update_projection_is_refused_where_it_cannot_reach_the_weights():
    with pytest.raises(ConfigError, match=r"learner\.subspace_project"):
        validate(compose(["learner=deepspeed", "learner.subspace_constraint=true",
                          "learner.subspace_project=update"]))
    with pytest.raises(ConfigError, match=r"learner\.subspace_rest"):
        validate(compose(["learner.subspace_constraint=true", "learner.subspace_rest=freeze"]))


@pytest.mark.parametrize("rest", ["freeze", "constrain"])
def test_a_run_under_the_update_projection_logs_its_span_share(tmp_path, use_tiny_world, rest):
    train(compose(TINY_RUN + ["eval.every=0", "trainer.steps=3", "learner.subspace_constraint=true",
                              "learner.subspace_from=0.34", "learner.subspace_k=2",
                              "learner.subspace_project=update", f"learner.subspace_rest={rest}"]),
          tmp_path)
    steps = [r for r in _records(tmp_path) if r["step"] > 0]
    assert "diag/param/outside_span" not in steps[0]  # before t0 (step 1): nothing constrained
    for r in steps[1:]:
        assert r["diag/param/outside_span"] < 1e-3 < r["diag/param/outside_span_proposed"]
