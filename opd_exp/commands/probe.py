"""`python -m opd_exp probe [overrides]`: will this pair distil? Before any training, with the
pair, prompts and sampling of the same config groups as `train`:

1. checks of what breaks real pairs — one vocabulary, padded embedding rows, the two chat
   templates (with their kwargs and system prompts), stop tokens, and the sampling engine's
   log-probs of its own tokens against the learner's forward pass;
2. student rollouts on `probe.prompts` training prompts (`probe.samples` each): the token
   diagnostics of SPEC §4 (opd_exp/loop/diagnose.py), the log-ratio by response position, the
   student's and the teacher's pass rates on the same prompts;
3. a verdict with its reasons. Thresholds (`probe.*`) and how they were calibrated on the toy
   conditions: docs/diagnostics.md.
Output: text on stdout and a JSON report (probe.out, default <run dir>/probe.json).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import DictConfig

from opd_exp.config import ConfigError, validate, validate_vocab
from opd_exp.config.registry import ROLLOUTS, TEACHERS, resolve
from opd_exp.core.types import Sampling, StepBatch
from opd_exp.data import make_encoder, make_prompts, student_encoder
from opd_exp.engines.hf_models import (check_same_vocab, check_vocab_sizes, load_model,
                                       load_tokenizer, model_shape, stop_token_ids)
from opd_exp.engines.hf_policy import HFPolicy
from opd_exp.engines.learner_torch import batch_logprobs
from opd_exp.engines.teacher_xtok import XTokTeacher
from opd_exp.engines.token_bytes import token_bytes
from opd_exp.evaluation import rollout_correctness
from opd_exp.loop.build import teacher_reads
from opd_exp.loop.diagnose import token_metrics
from opd_exp.loop.pair import check_cross_tokenizer, vocab_relation


def pair_checks(cfg: DictConfig) -> tuple[list[dict], dict]:
    """(the checks: name, status ok | warn | fail, detail; what the sampling needs)."""
    p, d = cfg.pair, cfg.data
    checks = []

    def add(name: str, status: str, detail: str) -> None:
        checks.append({"check": name, "status": status, "detail": detail})

    tok, ttok = load_tokenizer(p.student, "pair.student"), load_tokenizer(p.teacher, "pair.teacher")
    cross = vocab_relation(tok, ttok, cfg.objective.mask_unshared) == "different"
    unshared = [] if cross else check_same_vocab(tok, ttok, cfg.objective.mask_unshared)
    if cross:
        try:
            check_cross_tokenizer(cfg)
            overlap = vocab_overlap(token_bytes(tok), token_bytes(ttok))
            add("vocabulary", "warn", f"different tokenizers ({len(tok)} and {len(ttok)} tokens): "
                f"the teacher scores chunks of the same bytes (cross-tokenizer OPD); "
                f"{overlap['student_in_teacher']:.1%} of the student's tokens are teacher tokens "
                f"(same bytes), {overlap['teacher_in_student']:.1%} of the teacher's are student's")
        except ConfigError as e:
            add("vocabulary", "fail", str(e))
    else:
        add("vocabulary", "ok" if not unshared else "warn",
            "one vocabulary" if not unshared else f"{len(unshared)} student ids not shared (masked)")
    rows = {f"pair.{who}": model_shape(p[who], f"pair.{who}")[0] for who in ("student", "teacher")
            if who == "student" or not cross}
    try:
        vocab, note = check_vocab_sizes(tok, rows)
        add("embedding rows", "ok", note or f"{vocab} tokens, no padded rows")
    except ConfigError as e:
        add("embedding rows", "fail", str(e))
        vocab = len(tok)
    sample_prompt = "What is 2 + 3?"
    mine = student_encoder(cfg, tok, ttok, d.prompt_suffix)(sample_prompt)
    own = make_encoder(ttok, d.chat_template, d.prompt_suffix, p.teacher)(sample_prompt)
    scored_under = "its own" if p.teacher_prompt == "own" else "the student's"
    add("chat templates", "ok" if mine == own or p.teacher_prompt == "own" else "warn",
        "the same rendering" if mine == own else
        f"they differ (student {len(mine)} tokens, teacher {len(own)}); the teacher scores under "
        f"{scored_under} (pair.teacher_prompt={p.teacher_prompt}): "
        f"student {tok.decode(mine)!r} | teacher {ttok.decode(own)!r}")
    s_stop, t_stop = stop_token_ids(p.student, tok), stop_token_ids(p.teacher, ttok)
    add("stop tokens", "ok" if s_stop == t_stop else "warn",
        f"student {sorted(map(str, tok.convert_ids_to_tokens(sorted(s_stop))))}, teacher "
        f"{sorted(map(str, ttok.convert_ids_to_tokens(sorted(t_stop))))}; rollouts stop at either")
    stop_ids = s_stop | {i for i in t_stop if i < vocab and i not in unshared and not cross}
    return checks, {"tokenizer": tok, "vocab": vocab, "stop_ids": stop_ids,
                    "teacher_tokenizer": ttok, "cross": cross, "teacher_stop_ids": t_stop}


def vocab_overlap(s_bytes: list[bytes], t_bytes: list[bytes]) -> dict[str, float]:
    """The share of each side's tokens whose bytes are a token of the other side."""
    s, t = {b for b in s_bytes if b}, {b for b in t_bytes if b}
    return {"student_in_teacher": len(s & t) / max(1, len(s)), "teacher_in_student": len(s & t) / max(1, len(t))}


def verdict(report: dict, pc) -> tuple[str, list[str]]:
    """("go" | "caution" | "no-go", reasons), from the checks and the measurements (none when a
    check failed: the pair cannot be trained as configured)."""
    failed = [f"{c['check']}: {c['detail']}" for c in report["checks"] if c["status"] == "fail"]
    if failed:
        return "no-go", failed
    reasons, severe = [], False
    m = report["measured"]
    cross = "xtok_aligned_share" in m  # another tokenizer: no top-K overlap of ids to compare
    unmeasured = [k for k in ("teacher_pass_rate", "student_pass_rate") + (() if cross else (
        "overlap_mass_teacher", "early_overlap_mass_teacher")) if math.isnan(m[k])]
    if unmeasured:
        return "no-go", [f"not measured (no response tokens?): {', '.join(unmeasured)}"]
    if math.isnan(m["logprob_mismatch"]):
        reasons.append("the sampler returned no log-probs of its tokens: sampler vs learner not "
                       "compared")
    elif m["logprob_mismatch"] > pc.max_logprob_mismatch:
        reasons.append(f"the sampler's log-probs differ from the learner's by "
                       f"{m['logprob_mismatch']:.3g} per token (> {pc.max_logprob_mismatch}): "
                       "check temperature, generation defaults and the template")
    if cross and m["xtok_aligned_share"] < pc.min_aligned_share:
        reasons.append(f"only {m['xtok_aligned_share']:.2f} of the response tokens align with the "
                       f"teacher's bytes (< {pc.min_aligned_share}): the rest get no signal; "
                       "check the templates' end and thinking tokens")
    early, mass = m.get("early_overlap_mass_teacher", 1.0), m.get("overlap_mass_teacher", 1.0)
    if not cross and (early < pc.min_early_overlap_mass or mass < pc.min_overlap_mass):
        severe = True
        reasons.append(f"thinking patterns look incompatible: teacher overlap mass {early:.2f} at "
                       f"the first {pc.early_positions} positions, {mass:.2f} overall (< "
                       f"{pc.min_early_overlap_mass} / {pc.min_overlap_mass}); try "
                       "schedule=cold_start")
    gap = m["teacher_pass_rate"] - m["student_pass_rate"]
    if gap < pc.min_pass_gap:
        severe = True
        reasons.append(f"the teacher offers little the student cannot do: pass rate "
                       f"{m['teacher_pass_rate']:.2f} vs the student's {m['student_pass_rate']:.2f} "
                       f"(gap {gap:.2f} < {pc.min_pass_gap}); try a stronger teacher or "
                       "prompts=teacher_aligned")
    return ("no-go" if severe else "caution" if reasons else "go"), reasons


@torch.no_grad()
def run_probe(cfg: DictConfig, run_dir: Path) -> dict:
    validate(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.trainer.seed)
    checks, ctx = pair_checks(cfg)
    pc, p = cfg.probe, cfg.pair
    report = {"pair": {w: p[w].path for w in ("student", "teacher")}, "prompts": 0,
              "samples": pc.samples, "checks": checks, "measured": {}, "by_position": {}}
    if not any(c["status"] == "fail" for c in checks):
        validate_vocab(cfg, ctx["vocab"])
        report.update(measure(cfg, ctx, run_dir))
    report["verdict"], report["reasons"] = verdict(report, pc)
    out = Path(pc.out) if pc.out else run_dir / "probe.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(render(report) + f"\nreport: {out}", flush=True)
    return report


def measure(cfg: DictConfig, ctx: dict, run_dir: Path) -> dict:
    """Student rollouts on the probe prompts, scored by the teacher under the prompt it trains
    with (pair.teacher_prompt); token diagnostics; both pass rates (the teacher sampling after
    its own prompt where it has one)."""
    tok, pc, d, p = ctx["tokenizer"], cfg.probe, cfg.data, cfg.pair
    student = load_model(p.student, "pair.student").eval()
    rollout = resolve(ROLLOUTS[cfg.rollout.backend])(cfg, student, tok, ctx["stop_ids"], run_dir, 0)
    ttok = ctx["teacher_tokenizer"]
    teacher, teacher_rollout = resolve(TEACHERS[cfg.teacher.backend])(
        cfg, ttok if ctx["cross"] else tok, ctx["teacher_stop_ids"] if ctx["cross"] else ctx["stop_ids"])
    if ctx["cross"]:
        teacher = XTokTeacher(teacher, tok, ttok, ctx["stop_ids"], cfg.xtok.credit, cfg.xtok.loss,
                              teacher_reads(cfg, model_shape(p.teacher, "pair.teacher")[1]))
    encode = student_encoder(cfg, tok, ttok, d.prompt_suffix)
    own = make_encoder(ttok, d.chat_template, d.prompt_suffix, p.teacher) \
        if p.teacher_prompt == "own" else None
    pool = make_prompts(d, cfg.trainer.seed)
    problems = [pool.pool[i] for i in pool.order(0)[:pc.prompts]]
    prompts, answers = [encode(q.prompt) for q in problems], [q.answer for q in problems]
    sampling = replace(Sampling.from_cfg(cfg.rollout), n=pc.samples)
    r = rollout.generate(prompts, sampling)
    scored = r if own is None else r.with_prompts([own(q.prompt) for q in problems], tok.pad_token_id)
    view = HFPolicy(student, vocab_size=ctx["vocab"])
    batch = StepBatch(r, teacher.score(scored, "sampled"))
    batch.logp_old_B_T = batch_logprobs(view, batch, sampling.temperature, cfg.learner.micro_batch_size)
    mask = r.response_mask_B_T
    mismatch = (((r.logp_B_T - batch.logp_old_B_T).abs() * mask).sum() / mask.sum()).item() \
        if r.logp_B_T is not None else float("nan")
    t = teacher_rollout.generate([own(q.prompt) for q in problems] if own else prompts, sampling)
    measured = {"logprob_mismatch": mismatch,
                "student_pass_rate": rollout_correctness(tok, r, answers).mean().item(),
                "teacher_pass_rate": rollout_correctness(ttok if ctx["cross"] else tok, t, answers).mean().item(),
                "response_len": mask.sum(-1).mean().item()}
    if ctx["cross"]:  # chunks, not ids: the alignment's shares (docs/metrics.md xtok/*)
        measured.update({k.replace("/", "_"): v for k, v in batch.teacher.metrics.items()})
        return {"prompts": len(problems), "by_position": {}, "measured": measured}
    diag = token_metrics(batch, view, teacher, scored, cfg)
    measured.update({
        "overlap_ratio": diag["diag/token/ratio"],
        "overlap_mass_teacher": diag["diag/token/mass_teacher"],
        "overlap_mass_student": diag["diag/token/mass_student"],
        "early_overlap_mass_teacher": diag["diag/token/early_mass_teacher"],
        "early_overlap_ratio": diag["diag/token/early_ratio"],
        "entropy_gap": diag["diag/token/entropy_gap"],
        "advantage": diag["diag/token/advantage"]})
    return {"prompts": len(problems), "by_position": {
        k.removeprefix("diag/token/"): v for k, v in diag.items() if "_pos" in k}, "measured": measured}


def render(report: dict) -> str:
    lines = [f"probe: {report['pair']['student']} ← {report['pair']['teacher']} "
             f"({report['prompts']} prompts × {report['samples']})"]
    lines += [f"  [{c['status']:4s}] {c['check']}: {c['detail']}" for c in report["checks"]]
    lines += [f"  {k:28s} {v:.4f}" for k, v in report["measured"].items()]
    pos = report["by_position"]
    keys = sorted({k.split("_pos")[1].rsplit("_", 1)[0] for k in pos if k.startswith("log_ratio")},
                  key=lambda b: int(b.split("_")[0]))
    lines.append("  log q − log p by position (min / p10 / p50):")
    lines += [f"    {b:>9s}  " + " / ".join(f"{pos.get(f'log_ratio_pos{b}_{s}', float('nan')):7.2f}"
                                          for s in ("min", "p10", "p50")) for b in keys]
    lines.append(f"verdict: {report['verdict']}")
    lines += [f"  - {x}" for x in report["reasons"]]
    return "\n".join(lines)
