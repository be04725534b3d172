"""One OPD step, written out: prompts → student rollouts → teacher scores → (importance weights)
→ objective.prepare → learner.update → sync the sampler. Returns `(batch, metrics)`. During a
cold start (schedule=cold_start) the rollouts are filtered teacher traces and the objective SFT."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from opd_exp.core.types import Rollouts, StepBatch, TeacherScores
from opd_exp.evaluation import rollout_correctness
from opd_exp.loop.build import Run
from opd_exp.loop.seeds import step_seed
from opd_exp.methods.importance import truncated_is_weights


def sample(run: Run, step: int, problems: list, cold: bool) -> tuple[list, object, bool, list | None, dict]:
    """(the problems, their rollouts, on-policy?, the teacher's own prompt ids or None, schedule/
    metrics): the student's own rollouts, the teacher's (objective.rollouts_from=teacher: sampled
    after the teacher's prompt, trained after the student's), or during a cold start the cached,
    filtered teacher traces (SFT: the teacher scores nothing)."""
    if cold:
        problems, rollouts, m = run.traces(problems)
        return problems, rollouts, False, None, {"schedule/cold_start": 1.0, **m}
    m = {} if run.traces is None else {"schedule/cold_start": 0.0}
    student = [run.encode(p.prompt) for p in problems]
    teacher = teacher_prompt_ids(run, problems)
    if run.cfg.objective.rollouts_from == "student" and run.cfg.rollout.max_staleness:
        # started during the previous step (with rollout.score_ahead: already Scored), or None
        rollouts = run.rollout.take(step, student)
        m["rollout/staleness"] = float(rollouts is not None)
        if rollouts is not None:
            m["rollout/ahead_seconds"] = run.rollout.sample_seconds
        if rollouts is None:
            rollouts = run.rollout.generate(student, run.sampling)
        return problems, rollouts, True, teacher, m
    if run.cfg.objective.rollouts_from == "student":
        return problems, run.rollout.generate(student, run.sampling), True, teacher, m
    rollouts = run.teacher_rollout.generate(teacher or student, run.sampling)
    if teacher:
        rollouts = rollouts.with_prompts(student, run.tokenizer.pad_token_id)
    return problems, rollouts, False, teacher, m


def teacher_prompt_ids(run: Run, problems: list) -> list | None:
    """Each prompt as its teacher renders it, or None when the teacher reads the student's."""
    if run.teacher_encode is None:
        return None
    return [run.teachers.prompt_ids(p) if run.teachers else run.teacher_encode(p.prompt) for p in problems]


@dataclass
class Scored:
    """A step's rollouts as sampled, as the loss reads them (special tokens masked, on the
    learner's device) and as the teacher read them (after its own prompt); the teacher's scores,
    the metrics of scoring and the teacher's wall time."""
    raw: Rollouts
    rollouts: Rollouts
    scored: Rollouts
    scores: TeacherScores
    metrics: dict[str, float]
    teacher_seconds: float


def score(run: Run, needs: str, problems: list, raw: Rollouts, teacher_prompts: list | None) -> Scored:
    """Special-token masking (objective.special_mask) and the teacher's scores (`needs`;
    multi-teacher OPD: each row by its prompt's teacher). Draws no random number: it may run in
    the background (rollout.score_ahead). (The verifier stays in the foreground: math-verify's
    timeouts work in the main thread only.)"""
    rollouts, mask_metrics = run.masker(raw)
    rollouts = rollouts.to(run.dist.device)
    t = time.time()
    scored = (rollouts if teacher_prompts is None  # the teacher reads its own prompt, same response
              else rollouts.with_prompts(teacher_prompts, run.tokenizer.pad_token_id))
    k = run.cfg.objective.k
    scores, metrics = ((run.teacher.score(scored, needs, k), {}) if run.teachers is None
                       else run.teachers.score(problems, scored, needs, k))
    metrics.update(scores.metrics)
    metrics.update({f"train/{key}": v for key, v in mask_metrics.items()})
    return Scored(raw, rollouts, scored, scores, metrics, time.time() - t)


def start_ahead(run: Run, step: int) -> None:
    """rollout.max_staleness=1: start sampling step `step`'s prompts in the background from the
    learner's current weights (loop/ahead.py) — and with rollout.score_ahead scoring them there
    too — unless the run ends or is still cold by then."""
    cfg = run.cfg
    if step >= cfg.trainer.steps or (run.traces is not None and step < cfg.schedule.cold_start_steps):
        return
    problems = run.dist.shard(step_prompts(run, step, False))
    then = None
    if cfg.rollout.score_ahead:
        needs, teacher = run.objective.teacher_needs, teacher_prompt_ids(run, problems)
        then = lambda r: score(run, needs, problems, r, teacher)  # noqa: E731
    run.rollout.start(step, [run.encode(p.prompt) for p in problems], run.sampling,
                      step_seed(cfg.trainer.seed, step, rank=run.dist.rank), then)


def step_prompts(run: Run, step: int, cold: bool) -> list:
    """The step's prompts. With schedule=cold_start, the objective's step s draws what an
    objective-only run draws at step s - cold_start_steps (the same prompts in every condition),
    and the cold-start steps draw from their own seeded order of the pool,
    `schedule.cold_start_prompts` at a time (0: data.prompts_per_step)."""
    sc = run.cfg.schedule
    if sc.name != "cold_start":
        return run.prompts.batch(step)
    if not cold:
        return run.prompts.batch(step - sc.cold_start_steps)
    cold_source = replace(run.prompts, seed=run.prompts.seed + 1,
                          per_step=sc.cold_start_prompts or run.prompts.per_step)
    return cold_source.batch(step)


def run_step(run: Run, step: int) -> tuple[StepBatch, dict[str, float]]:
    """Optimizer step `step` + 1 (zero-based `step`); metrics reduced over ranks."""
    cfg, dist = run.cfg, run.dist
    cold = run.traces is not None and step < cfg.schedule.cold_start_steps
    objective = run.sft if cold else run.objective
    # rollout.max_staleness=1: the next step's rollouts are started in the background (and with
    # rollout.score_ahead scored there) right after this step's are in hand, while this thread
    # draws no random number
    ahead = cfg.rollout.max_staleness > 0 and not cold
    t0 = time.time()
    if ahead:
        run.rollout.wait()
    torch.manual_seed(step_seed(cfg.trainer.seed, step, rank=dist.rank))
    problems = dist.shard(step_prompts(run, step, cold))  # this rank's prompts
    problems, rollouts, on_policy, teacher_prompts, schedule_metrics = sample(run, step, problems, cold)
    ahead_scored = isinstance(rollouts, Scored)  # rollout.score_ahead: scored in the background
    raw = rollouts.raw if ahead_scored else rollouts
    correct_B = rollout_correctness(run.tokenizer, raw, [p.answer for p in problems]).to(dist.device)
    # with this step's rollouts still to score here, the next job starts after that if it would
    # call the teacher too (rollout.score_ahead: one teacher, two threads — an in-process vLLM
    # engine mixes up two callers' requests) or if both are in-process vLLM engines (never two
    # at once)
    late = not ahead_scored and (cfg.rollout.score_ahead or cfg.rollout.backend == cfg.teacher.backend == "vllm")
    if ahead and not late:
        start_ahead(run, step + 1)
    s = rollouts if ahead_scored else score(run, objective.teacher_needs, problems, rollouts, teacher_prompts)
    t2 = time.time()
    t1 = t2 - (0.0 if ahead_scored else s.teacher_seconds)
    if ahead and late:
        start_ahead(run, step + 1)
    t_start = time.time() - t2  # sampling time
    rollouts, scored = s.rollouts, s.scored
    batch, is_metrics = StepBatch(rollouts, s.scores, correct_B=correct_B), {}
    if objective.needs_old_logp:
        batch.logp_old_B_T = run.learner.logprobs(batch, objective.temperature)
        if cfg.rollout.is_cap > 0 and on_policy and rollouts.logp_B_T is not None:
            batch, is_metrics = truncated_is_weights(batch, cfg.rollout.is_cap)
    batch, obj_metrics = objective.prepare(batch)
    if ahead and run.diag.token_due(step):  # diagnostics fork the RNG: the sampling ends first
        t_wait = time.time()
        run.rollout.wait()
        t_start += time.time() - t_wait  # sampling time too
    t_diag = time.time()
    diag_metrics = run.diag.before_update(step, batch, run.learner, run.teacher, scored, objective,
                                           on_policy)
    t_diag = time.time() - t_diag
    train_metrics = run.learner.update(batch, objective)
    diag_metrics.update(run.diag.after_learner_update(run.learner.policy))  # the subspace constraint
    t_sync = time.time()
    run.rollout.sync_weights(run.learner.policy)
    t3 = time.time()

    metrics = step_metrics(batch, train_metrics, {**is_metrics, **obj_metrics}, on_policy)
    metrics.update(s.metrics, **schedule_metrics)
    if ahead_scored:
        metrics["teacher/ahead_seconds"] = s.teacher_seconds
    if diag_metrics:
        metrics.update(diag_metrics, **{"diag/seconds": t_diag})
    metrics.update({"rollout/seconds": t1 - t0 + t_start, "teacher/seconds": t2 - t1,
                    "train/seconds": t_sync - t2 - t_start - t_diag, "rollout/sync_seconds": t3 - t_sync,
                    "train/step_seconds": time.time() - t0})
    return batch, dist.reduce_metrics(metrics)  # over ranks (docs/metrics.md)


def step_metrics(batch: StepBatch, train_metrics: dict, obj_metrics: dict,
                 on_policy: bool) -> dict[str, float]:
    """The step's train/, reward/ and rollout/ metrics (definitions: docs/metrics.md)."""
    mask = batch.mask_B_T
    out = {f"train/{k}": v for k, v in train_metrics.items()}
    out.update({f"reward/{k.removeprefix('reward_')}" if k.startswith("reward_") else f"train/{k}": v
                for k, v in obj_metrics.items()})
    if "reward_mean" in obj_metrics:
        out["train/reward_mean"] = obj_metrics["reward_mean"]
    out["rollout/response_len"] = mask.sum(-1).mean().item()
    out["rollout/tokens"] = mask.sum().item()
    out["rollout/accuracy"] = batch.correct_B.mean().item()
    r = batch.rollouts
    if on_policy and r.logp_B_T is not None and batch.logp_old_B_T is not None:
        n = mask.sum().clamp(min=1).item()
        out["rollout/logprob_mismatch"] = ((r.logp_B_T - batch.logp_old_B_T).abs() * mask).sum().item() / n
    return out
