"""A run, built from its config: the components of SPEC's loop and where the run starts.

Backends and objectives are looked up by name (opd_exp/config/registry.py) and imported only
when chosen, so this layer never imports an engine library itself. Each component gets the
config groups it uses.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf


from opd_exp.config import ConfigError
from opd_exp.config import registry
from opd_exp.config.registry import LEARNERS, OBJECTIVES, ROLLOUTS, TEACHERS, resolve
from opd_exp.core.protocols import Learner, Logger, Objective, RolloutBackend, Teacher
from opd_exp.core.ranks import Dist
from opd_exp.core.types import Sampling
from opd_exp.data import PromptSource, make_encoder, make_prompts, student_encoder
from opd_exp.engines.hf_models import load_model, resolve_path, save_model
from opd_exp.engines.hf_policy import HFPolicy, refuse_unless_head_alone
from opd_exp.engines.teacher_xtok import XTokTeacher
from opd_exp.loop.ahead import AheadSampler
from opd_exp.loop.diagnose import Diagnostics
from opd_exp.loop.evaluator import Evaluator
from opd_exp.loop.pair import Pair, load_pair
from opd_exp.loop.routing import Teachers
from opd_exp.loop.seeds import step_seed
from opd_exp.methods import make_objective
from opd_exp.methods.masking import SpecialTokenMask
from opd_exp.recipes.cold_start import TeacherTraces
from opd_exp.recipes.prompt_selection import overlaps, pass_rates, select_prompts
from opd_exp.runtime import checkpoint, distributed
from opd_exp.runtime.loggers import make_logger, read_records
from opd_exp.runtime.score_cache import CachedTeacher, teacher_identity


@dataclass
class Run:
    cfg: DictConfig
    run_dir: Path
    dist: Dist
    tokenizer: object
    learner: Learner
    rollout: RolloutBackend  # the student's sampler
    teacher: Teacher  # scores the student's tokens
    teacher_rollout: RolloutBackend  # the teacher's sampler (its eval, off-policy rollouts)
    masker: SpecialTokenMask
    objective: Objective
    prompts: PromptSource
    encode: Callable[[str], list[int]]  # prompt text → token ids
    teacher_encode: Callable[[str], list[int]] | None  # the teacher's own (pair.teacher_prompt=own)
    traces: TeacherTraces | None  # schedule=cold_start: the filtered teacher traces
    sft: Objective | None  # … and the objective of the cold start
    sampling: Sampling  # rollout.*
    evaluator: Evaluator
    diag: Diagnostics  # diag.*, learner.subspace_constraint
    logger: Logger
    start: int  # optimizer steps already done (a resumed run)
    ckpt_meta: dict  # what a resume must match
    teachers: Teachers | None = None  # pair.teachers: multi-teacher OPD, prompts routed by tag

    def close_engines(self) -> None:
        """The background sampler's thread, then this process's vLLM engines, newest first
        (rollout_vllm.shutdown_engines; vLLM's shutdown destroys the default process group it
        joined, so every rank must be past its last collective first: `finish`)."""
        if isinstance(self.rollout, AheadSampler):
            self.rollout.close()
        distributed.shutdown_vllm_engines()


def open_run_dir(cfg: DictConfig, run_dir: Path, dist: Dist,
                 ckpt_meta: dict) -> tuple[Path | None, bool]:
    """(the checkpoint to resume from or None, whether the old run's records must be deleted).
    A run dir that holds a run is resumed (`trainer.resume`: same maths unless
    `trainer.allow_config_change`) or started over (`trainer.overwrite`: deleted once the new run
    has passed every start-up check), never silently mixed with a new one."""
    run_dir.mkdir(parents=True, exist_ok=True)
    t = cfg.trainer
    resume_from = checkpoint.latest(run_dir) if t.resume else None
    if resume_from is not None:
        checkpoint.check_resumable(resume_from, ckpt_meta)
        if not t.allow_config_change:
            checkpoint.check_same_maths(resume_from, OmegaConf.to_container(cfg, resolve=True))
    clear = not t.resume and checkpoint.holds_run(run_dir)
    if clear and not t.overwrite:
        raise ConfigError(f"trainer.resume=False is not allowed: {run_dir} holds a run "
                          "(metrics.jsonl, checkpoints/); trainer.resume=true continues it, "
                          "trainer.overwrite=true starts over and deletes them")
    dist.barrier()  # every rank has looked before anything is written
    if dist.is_main:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return resume_from, clear


# what each run-dir cache depends on (a cache made under other values is started over:
# runtime/loggers.py read_cache); anything else may change on a resume without discarding it
_RENDERING_AND_SAMPLING = ("pair", "data.chat_template", "data.prompt_suffix", "prompts.template",
                           "teacher.backend", "trainer.seed", "rollout.temperature", "rollout.top_p",
                           "rollout.top_k", "rollout.max_new_tokens")
TRACES_DEPEND_ON = _RENDERING_AND_SAMPLING + ("schedule.filter", "schedule.max_retries")
SCORES_DEPEND_ON = _RENDERING_AND_SAMPLING + ("prompts.score", "prompts.samples", "prompts.k",
                                              "rollout.backend")


def made_under(cfg: DictConfig, keys: tuple[str, ...]) -> dict:
    return {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
            for k in keys for v in [OmegaConf.select(cfg, k)]}


def prompt_pool(cfg: DictConfig, encoders: list, contexts: list) -> PromptSource:
    """The training prompts; one whose rendering (by every model that reads it) plus
    rollout.max_new_tokens exceeds a context (model configs, rollout / teacher max_model_len)
    is left out and counted."""
    pc = cfg.prompts
    prompts = make_prompts(cfg.data, cfg.trainer.seed, pc.content, pc.teacher_data,
                           cfg.pair.teacher.path).dedup(pc.dedup)
    limits = [c for c in [cfg.rollout.max_model_len, cfg.teacher.max_model_len, *contexts] if c]
    if not limits:
        return prompts
    # a vLLM teacher reads prompt + response as a prompt and must generate one token after it:
    # vLLM refuses a prompt as long as its context
    room = min(limits) - cfg.rollout.max_new_tokens - (cfg.teacher.backend != "hf")
    return prompts.keep(lambda p: all(len(enc(p.prompt)) <= room for enc in encoders),
                        "skipped_too_long")


def head_alone_at_start(cfg: DictConfig, model: torch.nn.Module, who: str) -> None:
    """What applies `who`'s LM head alone (packing, the LM-head objectives, token diagnostics,
    overlap prompt scores, a teacher's top-K or hidden scores) is refused at start-up, not at its
    first step, for a model whose logits are more than that head (engines/hf_policy.py)."""
    needs = registry.teacher_needs(cfg.objective)
    uses = {"student": [("objective.name", cfg.objective.name, cfg.objective.name in registry.READS_LM_HEAD),
                        ("learner.packing", cfg.learner.packing, cfg.learner.packing)],
            "teacher": [("objective.name", cfg.objective.name, needs in ("topk", "hidden")),
                        ("teacher.packing", cfg.teacher.packing, cfg.teacher.packing)]}[who]
    uses += [("diag.every", cfg.diag.every, cfg.diag.every > 0),
             ("prompts.score", cfg.prompts.score, cfg.prompts.score == "overlap")]
    for field, value, on in uses:
        if on:
            refuse_unless_head_alone(model, f"{field}={value!r} (pair.{who})")
            return


def check_routes(routes, prompts: PromptSource) -> None:
    """A route whose tag no prompt has would load its teacher for nothing (a field read as text:
    a tag 5.0 is "5.0", not "5")."""
    tags = {p.tag for p in prompts.pool}
    for tag in routes:
        if tag not in tags:
            seen = ", ".join(repr(t) for t in sorted(tags)[:8]) + (" …" if len(tags) > 8 else "")
            left = {k: v for k, v in prompts.skipped.items() if v}
            raise ConfigError(f"pair.routes.{tag}: no training prompt has the tag {tag!r} "
                              f"(the pool's tags: {seen}{'; left out: ' + str(left) if left else ''})")


def routed_teachers(cfg: DictConfig, main: Teacher, main_tok, tokenizer, stop_ids: set[int],
                    dist: Dist, others: dict) -> Teachers:
    """pair.teachers, each built as pair.teacher is (teacher.backend), beside it ("main");
    `others`: name → (model config, tokenizer), `main_tok` pair.teacher's tokenizer."""
    scorers, encoders = {"main": main}, {}
    d = cfg.data
    for name, (mc, tok) in {"main": (cfg.pair.teacher, main_tok), **others}.items():
        if name != "main":
            one = OmegaConf.merge(cfg, {"pair": {"teacher": mc}})
            scorers[name], _ = resolve(TEACHERS[cfg.teacher.backend])(one, tokenizer, stop_ids, dist.device)
        if cfg.pair.teacher_prompt == "own":
            encoders[name] = make_encoder(tok, d.chat_template, d.prompt_suffix, mc)
    return Teachers(scorers, dict(cfg.pair.routes), encoders)


def teacher_reads(cfg: DictConfig, context: int | None) -> int | None:
    """The most prompt + response tokens the teacher's engine reads (`context`: its model's): a
    vLLM teacher (in process or served with the run's overrides) must generate one token after."""
    contexts = [c for c in (cfg.teacher.max_model_len, context) if c]
    return min(contexts) - (cfg.teacher.backend != "hf") if contexts else None


def make_teacher(cfg: DictConfig, pair: Pair, dist: Dist) -> tuple[Teacher, RolloutBackend]:
    """The teacher's scorer (teacher.backend) and its sampler, in the teacher's own tokens; a
    teacher with another tokenizer scores the student's tokens through chunks of the same bytes
    (engines/teacher_xtok.py)."""
    teacher, sampler = resolve(TEACHERS[cfg.teacher.backend])(
        cfg, pair.teacher_tok if pair.cross_tokenizer else pair.tokenizer, pair.teacher_stop_ids,
        dist.device)
    if isinstance(getattr(teacher, "model", None), torch.nn.Module):  # the HF teacher
        head_alone_at_start(cfg, teacher.model, "teacher")
    if pair.cross_tokenizer:
        # the context: the model's, or a teacher server's own (started with other overrides)
        contexts = [c for c in (pair.shapes["pair.teacher"][1], getattr(teacher, "max_model_len", None)) if c]
        teacher = XTokTeacher(teacher, pair.tokenizer, pair.teacher_tok, pair.stop_ids, cfg.xtok.credit,
                              cfg.xtok.loss, teacher_reads(cfg, min(contexts, default=None)))
    return teacher, sampler


def selected_prompts(cfg: DictConfig, prompts: PromptSource, pair: Pair, dist: Dist, work_dir: Path,
                     learner: Learner, rollout: RolloutBackend, teacher: Teacher,
                     teacher_rollout: RolloutBackend, encode, teacher_encode) -> PromptSource:
    """prompts.score: the pool scored by the student before it trains (teacher pass rate or
    top-K overlap; cached in the run dir for a resume, teacher scores in teacher.cache_dir) and
    its top share kept (recipes/prompt_selection.py)."""
    pc, sampling = cfg.prompts, Sampling.from_cfg(cfg.rollout)
    scorer = teacher if cfg.teacher.cache_dir is None else CachedTeacher(
        teacher, cfg.teacher.cache_dir, teacher_identity(
            cfg.pair.teacher, cfg.teacher.backend, resolve_path(cfg.pair.teacher.path),
            len(pair.tokenizer), pair.shapes["pair.teacher"][0]))

    def score(problems: list, chunk_no: int) -> list[float]:
        torch.manual_seed(step_seed(cfg.trainer.seed, chunk_no, purpose=2, rank=dist.rank))
        if pc.score == "pass_rate":
            return pass_rates(problems, teacher_rollout, teacher_encode or encode,
                              replace(sampling, n=pc.samples), pair.tokenizer)
        return overlaps(problems, rollout, encode, sampling,
                        HFPolicy(learner.policy, vocab_size=pair.vocab), scorer, pc.k, dist.device,
                        cfg.learner.micro_batch_size, teacher_encode, pair.tokenizer.pad_token_id)
    prompts = select_prompts(prompts, pc, work_dir / "prompt_scores.jsonl",
                             made_under(cfg, SCORES_DEPEND_ON), dist, score)
    if scorer is not teacher:  # sequences scored by the teacher: read back / asked (all ranks)
        prompts = replace(prompts, info={**prompts.info, **dist.reduce_metrics(
            {"data/teacher_cache_hits": scorer.hits, "data/teacher_cache_misses": scorer.misses})})
    return prompts


def resume(cfg: DictConfig, run_dir: Path, resume_from: Path, learner: Learner, diag: Diagnostics,
           evaluator: Evaluator) -> int:
    """The checkpoint's learner and diagnostics state, the step-0 evaluations; its step."""
    learner.load(resume_from)
    diag.load(resume_from, learner.policy)
    start = checkpoint.load_step(resume_from)
    evaluator.recall(read_records(run_dir / "metrics.jsonl"))
    lag = (" (rollout.max_staleness=1: this first step samples in the foreground from the "
           "checkpoint's weights, one update newer than an uninterrupted run's)"
           if cfg.rollout.max_staleness else "")
    print(f"resumed from {resume_from} at step {start}{lag}")
    return start


def sample_ahead(cfg: DictConfig, rollout: RolloutBackend, teacher_rollout: RolloutBackend,
                 learner: Learner) -> AheadSampler:
    """rollout.max_staleness=1: the sampler run one step ahead in a background thread."""
    shares = getattr(rollout, "shares_weights", False)  # HF generate: its own copy of the policy
    # the background thread's torch threads as trainer.threads, unless it runs the kernels of
    # an in-process vLLM engine (they keep the count the engine was set up with)
    here = getattr(rollout, "kernels_in_process", False) or (
        cfg.rollout.score_ahead and getattr(teacher_rollout, "kernels_in_process", False))
    return AheadSampler(rollout, learner.policy, shares, None if here else torch.get_num_threads())


def build(cfg: DictConfig, run_dir: Path, dist: Dist) -> Run:
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    ckpt_meta = {"learner": cfg.learner.backend, "ranks": dist.world_size}
    resume_from, clear = open_run_dir(cfg, run_dir, dist, ckpt_meta)
    student_cfg = cfg.pair.student if resume_from is None else OmegaConf.merge(
        cfg.pair.student, {"path": str(resume_from / "student")})
    pair = load_pair(cfg, student_cfg)
    tokenizer, teacher_tok, vocab, stop_ids = pair.tokenizer, pair.teacher_tok, pair.vocab, pair.stop_ids
    if pair.note and dist.is_main:
        print(pair.note, flush=True)
    student = load_model(student_cfg, "pair.student").to(dist.device)
    learner = resolve(LEARNERS[cfg.learner.backend])(cfg, student, dist, run_dir, vocab)
    head_alone_at_start(cfg, learner.policy, "student")
    diag = Diagnostics.make(cfg, run_dir, dist, learner.policy,
                            None if resume_from is None else checkpoint.load_step(resume_from))
    work_dir = run_dir if dist.world_size == 1 else run_dir / f"rank{dist.rank}"
    rollout = resolve(ROLLOUTS[cfg.rollout.backend])(cfg, learner.policy, tokenizer, stop_ids,
                                                     work_dir, dist.rank)
    teacher, teacher_rollout = make_teacher(cfg, pair, dist)
    teachers = (routed_teachers(cfg, teacher, teacher_tok, tokenizer, stop_ids, dist, pair.others)
                if pair.others else None)
    masker = SpecialTokenMask.from_cfg(cfg.objective, tokenizer, stop_ids, pair.unshared)
    objective = make_objective(cfg.objective, cfg.reward, cfg.rollout.temperature, dist)
    d, t, pc = cfg.data, cfg.pair.teacher, cfg.prompts
    encode = student_encoder(cfg, tokenizer, teacher_tok, d.prompt_suffix)
    own = cfg.pair.teacher_prompt == "own"
    teacher_encode = make_encoder(teacher_tok, d.chat_template, d.prompt_suffix, t) if own else None
    routed = list(teachers.encoders.values()) if teachers else []  # each teacher's own rendering
    prompts = prompt_pool(cfg, [e for e in (encode, teacher_encode, *routed) if e],
                          [c for _, c in pair.shapes.values()])
    check_routes(cfg.pair.routes, prompts)
    cold, sampling = cfg.schedule.name == "cold_start", Sampling.from_cfg(cfg.rollout)
    evaluator = Evaluator(cfg.eval, cfg.trainer.seed, tokenizer,
                          student_encoder(cfg, tokenizer, teacher_tok, cfg.eval.prompt_suffix), dist,
                          make_encoder(teacher_tok, d.chat_template, cfg.eval.prompt_suffix, t)
                          if own else None, teacher_tok if pair.cross_tokenizer else None)
    if clear:  # trainer.overwrite: every check passed, the old run's records go now
        if dist.is_main:
            checkpoint.clear(run_dir)
        dist.barrier()
    if pc.score != "none":  # scored by the student before it trains (cached for a resume)
        prompts = selected_prompts(cfg, prompts, pair, dist, work_dir, learner, rollout, teacher,
                                   teacher_rollout, encode, teacher_encode)
    traces = TeacherTraces(work_dir / "cold_start_traces.jsonl", made_under(cfg, TRACES_DEPEND_ON),
                           teacher_rollout, tokenizer, encode, teacher_encode or encode, sampling,
                           stop_ids, cfg.schedule) if cold else None
    sft = resolve(OBJECTIVES["sft"])(cfg.objective, cfg.reward, cfg.rollout.temperature, dist) if cold else None
    start = 0 if resume_from is None else resume(cfg, run_dir, resume_from, learner, diag, evaluator)
    if cfg.rollout.max_staleness:  # sampled one step ahead, in the background (loop/ahead.py)
        rollout = sample_ahead(cfg, rollout, teacher_rollout, learner)
    logger = make_logger(cfg.logger, run_dir, OmegaConf.to_container(cfg, resolve=True),
                         resume_step=start if resume_from is not None else None, main=dist.is_main)
    return Run(cfg, run_dir, dist, tokenizer, learner, rollout, teacher, teacher_rollout, masker,
               objective, prompts, encode, teacher_encode, traces, sft, sampling,
               evaluator, diag, logger, start, ckpt_meta, teachers)


def save_checkpoint(run: Run, step: int) -> None:
    """Atomic checkpoint of the learner state and the HF student (opd_exp/runtime/checkpoint.py)."""
    def write(d: Path) -> None:
        run.learner.save(d)  # collective under DeepSpeed
        run.diag.save(d)
        if run.dist.is_main:
            save_model(run.learner.policy, run.tokenizer, d / "student")
            (d / "config.yaml").write_text(OmegaConf.to_yaml(run.cfg, resolve=True))
    checkpoint.save(run.run_dir, step, write, run.cfg.trainer.keep_last, run.dist, run.ckpt_meta)
