"""Validation: ranges and names, one line per problem naming the field and what is allowed."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from opd_exp.config import registry
from opd_exp.config.errors import ConfigError
from opd_exp.config.schema import sequences_per_rank


def zero_stage(lc) -> int:
    """The ZeRO stage in effect: the user's JSON (learner.deepspeed_config) wins over the key."""
    if lc.deepspeed_config:
        try:
            user = json.loads(Path(lc.deepspeed_config).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"learner.deepspeed_config={lc.deepspeed_config!r} is not allowed: "
                              f"not a readable JSON file ({type(e).__name__})") from e
        return int(user.get("zero_optimization", {}).get("stage", lc.zero_stage))
    return lc.zero_stage


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def _choice(key: str, value: Any, choices) -> None:
    _require(value in choices, key, value, "one of " + ", ".join(map(str, sorted(choices))))


def validate_vocab(cfg: DictConfig, vocab_size: int) -> None:
    """Checks that need the tokenizer's vocabulary size (known once the pair is loaded)."""
    o = cfg.objective
    for key in ("prompts.k", "diag.k"):
        k = OmegaConf.select(cfg, key)
        _require(k <= vocab_size, key, k, f"an integer <= the vocabulary size {vocab_size}")
    if o.name == "topk":
        _require(o.k <= vocab_size, "objective.k", o.k,
                 f"an integer <= the vocabulary size {vocab_size}")


def validate_teachers(cfg: DictConfig) -> None:
    """Multi-teacher OPD (pair.teachers, pair.routes): what it supports today."""
    p = cfg.pair
    names = {"main", *p.teachers}
    for name, m in p.teachers.items():  # "eval": teacher/eval/… are the teacher's eval metrics
        _require(name not in ("main", "eval") and name.isidentifier(), "pair.teachers", name,
                 "names that are identifiers other than main (pair.teacher's name) and eval")
        _require(bool(m.path), f"pair.teachers.{name}.path", m.path, "a hub id, a folder or toy:<name>")
        _choice(f"pair.teachers.{name}.dtype", m.dtype, {"float32", "bfloat16", "float16"})
    for tag, name in p.routes.items():
        _choice(f"pair.routes.{tag}", name, names)
    if p.routes and cfg.data.source != "toy":  # else every tag is "" and every row goes to main
        _require(bool(cfg.data.tag_field), "data.tag_field", cfg.data.tag_field,
                 "the rows' field that pair.routes reads (e.g. domain) with data.source="
                 + cfg.data.source)
    if not p.teachers:
        return
    why = "with pair.teachers (multi-teacher OPD supports "
    _require(registry.teacher_needs(cfg.objective) in ("none", "sampled", "topk"), "objective.name",
             cfg.objective.name, why + "the sampled-token and teacher top-K objectives: a "
             "vocabulary-wide one needs one teacher's LM head)")
    _require(cfg.teacher.backend in ("hf", "vllm"), "teacher.backend", cfg.teacher.backend,
             why + "hf or vllm)")
    _require(cfg.schedule.name == "none", "schedule.name", cfg.schedule.name, why + "none)")
    _require(cfg.prompts.score == "none", "prompts.score", cfg.prompts.score, why + "none)")
    _require(cfg.diag.every == 0, "diag.every", cfg.diag.every, why + "0)")
    _require(cfg.objective.rollouts_from == "student", "objective.rollouts_from",
             cfg.objective.rollouts_from, why + "student)")


def validate_training(cfg: DictConfig) -> None:
    """What only training needs (eval, probe and serve may load a bf16 student): pure-bf16 AdamW
    rounds an update smaller than ~1/256 of a weight to nothing (at lr 2e-6, most of them), so a
    low-precision student trains with fp32 master weights (DeepSpeed bf16)."""
    _require(cfg.learner.backend != "torch" or cfg.pair.student.dtype == "float32", "pair.student.dtype",
             cfg.pair.student.dtype, "float32 with learner=torch (its AdamW steps the weights in "
             "their own dtype); a bf16 student: learner=deepspeed learner.precision=bf16 "
             "(fp32 master weights)")


def validate(cfg: DictConfig, on_this_machine: bool = True) -> None:
    """Check ranges and names; raise ConfigError on the first bad field. `on_this_machine=False`
    (plan, offline checks of GPU configs): leave out what only this machine's hardware decides
    (vLLM sleep mode needs CUDA)."""
    for who in ("student", "teacher"):
        m = cfg.pair[who]
        _require(bool(m.path), f"pair.{who}.path", m.path, "a hub id, a folder or toy:<name>")
        _choice(f"pair.{who}.dtype", m.dtype, {"float32", "bfloat16", "float16"})
    _choice("pair.teacher_prompt", cfg.pair.teacher_prompt, {"student", "own"})
    rw = cfg.reward
    _choice("reward.name", rw.name, registry.REWARDS)
    _choice("xtok.credit", cfg.xtok.credit, registry.XTOK_CREDITS)
    _choice("xtok.loss", cfg.xtok.loss, registry.XTOK_LOSSES)
    _require(rw.alpha > 0, "reward.alpha", rw.alpha, "a number > 0")
    _require(rw.clip > 0, "reward.clip", rw.clip, "a number > 0")
    _require(rw.eps > 0, "reward.eps", rw.eps, "a number > 0")
    _require(0 <= rw.mix_lambda <= 1, "reward.mix_lambda", rw.mix_lambda, "0 <= mix_lambda <= 1")
    _require(rw.early_positions >= 1, "reward.early_positions", rw.early_positions, "an integer >= 1")
    o = cfg.objective
    _choice("objective.name", o.name, registry.OBJECTIVES)
    _require(0 <= o.gamma <= 1, "objective.gamma", o.gamma, "0 <= gamma <= 1")
    _require(0 < o.clip_eps < 1, "objective.clip_eps", o.clip_eps, "0 < clip_eps < 1")
    _require(o.clip_eps_high is None or o.clip_eps_high > 0, "objective.clip_eps_high",
             o.clip_eps_high, "null or a number > 0")
    _choice("objective.divergence", o.divergence, {"reverse_kl", "forward_kl", "jsd"})
    _require(0 <= o.beta <= 1, "objective.beta", o.beta, "0 <= beta <= 1")
    _require(o.k >= 1, "objective.k", o.k, "an integer >= 1")
    _choice("objective.support", o.support, {"teacher", "student", "intersection", "union"})
    _choice("objective.gradient", o.gradient, {"analytic", "pg"})
    _choice("objective.weight", o.weight, {"student", "teacher", "uniform"})
    _require(o.chunk_size >= 1, "objective.chunk_size", o.chunk_size, "an integer >= 1")
    _choice("objective.rollouts_from", o.rollouts_from, {"student", "teacher"})
    _require(not o.mask_unshared or o.name in ("sampled_token", "sft"), "objective.mask_unshared",
             o.mask_unshared, f"false with objective.name={o.name} (vocabulary-wide objectives "
             "compare the two distributions id by id: they need one vocabulary)")
    r = cfg.rollout
    _choice("rollout.backend", r.backend, registry.ROLLOUTS)
    _require(r.n >= 1, "rollout.n", r.n, "an integer >= 1")
    for prefix, s in (("rollout", r), ("eval", cfg.eval)):
        _require(s.temperature > 0, f"{prefix}.temperature", s.temperature, "a number > 0")
        _require(0 < s.top_p <= 1, f"{prefix}.top_p", s.top_p, "0 < top_p <= 1")
        _require(s.top_k >= 0, f"{prefix}.top_k", s.top_k, "an integer >= 0 (0 = off)")
        _require(s.max_new_tokens >= 1, f"{prefix}.max_new_tokens", s.max_new_tokens,
                 "an integer >= 1")
    _require(r.batch_size >= 1, "rollout.batch_size", r.batch_size, "an integer >= 1")
    _require(r.sync_every >= 1, "rollout.sync_every", r.sync_every, "an integer >= 1")
    _require(not r.sleep or r.backend == "vllm", "rollout.sleep", r.sleep,
             "false unless rollout.backend=vllm (GPU only)")
    if r.sleep and on_this_machine:
        import torch

        _require(torch.cuda.is_available(), "rollout.sleep", r.sleep,
                 "false on a machine without CUDA (vLLM sleep mode is GPU only)")
    _require(r.server_url.startswith(("http://", "https://")), "rollout.server_url", r.server_url,
             "an http(s):// address")
    _choice("rollout.weight_sync", r.weight_sync, {"memory", "disk"})
    _choice("rollout.dtype", r.dtype, {"", "float32", "bfloat16", "float16"})
    _require(r.max_num_batched_tokens >= 0, "rollout.max_num_batched_tokens", r.max_num_batched_tokens,
             "0 (vLLM's default) or a number of tokens")
    _require(r.max_num_seqs >= 0, "rollout.max_num_seqs", r.max_num_seqs, "0 (vLLM's default) or an integer")
    _require(cfg.teacher.max_num_batched_tokens >= 0, "teacher.max_num_batched_tokens",
             cfg.teacher.max_num_batched_tokens, "0 (vLLM's default) or a number of tokens")
    _require(cfg.plan.gpu_memory_gib >= 0, "plan.gpu_memory_gib", cfg.plan.gpu_memory_gib,
             "0 (the visible GPU's) or a size in GiB")
    _require(cfg.serve.tensor_parallel_size >= 1, "serve.tensor_parallel_size",
             cfg.serve.tensor_parallel_size, "an integer >= 1 (GPUs one server spans)")
    _require(0 <= cfg.serve.gpu_memory_utilization <= 1, "serve.gpu_memory_utilization",
             cfg.serve.gpu_memory_utilization, "0 (the rollout's / teacher's share) or a share in (0, 1]")
    _require(cfg.plan.prompt_tokens >= 1, "plan.prompt_tokens", cfg.plan.prompt_tokens, "an integer >= 1")
    _require(r.is_cap == 0 or r.is_cap >= 1, "rollout.is_cap", r.is_cap, "0 (off) or a number >= 1")
    _require(r.max_staleness in (0, 1), "rollout.max_staleness", r.max_staleness,
             "0 (each step samples from its own weights) or 1 (one step ahead, in the background)")
    if r.max_staleness:
        _require(cfg.learner.backend == "torch", "rollout.max_staleness", r.max_staleness,
                 f"0 with learner.backend={cfg.learner.backend} (background sampling is built for "
                 "the torch learner)")
        _require(o.rollouts_from == "student", "rollout.max_staleness", r.max_staleness,
                 "0 with objective.rollouts_from=teacher (only the student's rollouts run ahead)")
        _require(r.sync_every == 1, "rollout.sync_every", r.sync_every, "1 with rollout.max_staleness=1")
        _require(o.name != "sampled_token" or r.is_cap > 0, "rollout.is_cap", r.is_cap,
                 "a number >= 1 (e.g. 2.0) with rollout.max_staleness=1: the sampled-token "
                 "estimator must correct the one-step lag by importance weights")
        _require(o.name != "sampled_token" or r.backend == "hf" or r.temperature == 1.0,
                 "rollout.temperature", r.temperature, f"1.0 with rollout.backend={r.backend} and "
                 "rollout.max_staleness=1 (vLLM gives sampled log-probs at temperature 1 only, and "
                 "the sampled-token estimator needs them to correct the lag)")
        _require(not r.sleep, "rollout.sleep", r.sleep, "false with rollout.max_staleness=1 (the "
                 "engine samples while the learner trains)")
        # an in-process vLLM engine used from the background thread: the rollout's, or with
        # score_ahead the teacher's
        engine = ("rollout=vllm" if r.backend == "vllm" else
                  "teacher=vllm and rollout.score_ahead=true" if r.score_ahead and cfg.teacher.backend == "vllm"
                  else None)
        in_process = engine and registry.vllm_in_process()
        cores = len(os.sched_getaffinity(0))
        _require(not in_process or cfg.trainer.threads in (0, cores), "trainer.threads", cfg.trainer.threads,
                 f"0 or {cores} (all cores) with {engine} and rollout.max_staleness=1 while vLLM's "
                 "engine runs in this process (its CPU kernels, run from the background thread, "
                 "check for the thread count vLLM set up: one per core); or "
                 "VLLM_ENABLE_V1_MULTIPROCESSING=1")
    _require(r.max_model_len >= 0, "rollout.max_model_len", r.max_model_len, "an integer >= 0")
    _require(r.kv_cache_mib >= 0, "rollout.kv_cache_mib", r.kv_cache_mib, "an integer >= 0 (0 = the engine decides)")
    _require(0 < r.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization",
             r.gpu_memory_utilization, "0 < x <= 1")
    tc = cfg.teacher
    _choice("teacher.backend", tc.backend, registry.TEACHERS)
    needs = registry.teacher_needs(o)
    _require(needs in registry.NEEDS_BY_TEACHER[tc.backend], "teacher.backend", tc.backend,
             f"hf with objective.name={o.name}, objective.support={o.support} (it needs the "
             f"teacher's {needs} scores, which only the HF forward gives)")
    _require(tc.max_model_len >= 0, "teacher.max_model_len", tc.max_model_len, "an integer >= 0")
    _require(0 < tc.gpu_memory_utilization <= 1, "teacher.gpu_memory_utilization",
             tc.gpu_memory_utilization, "0 < x <= 1")
    _require(tc.backend != "vllm_server" or len(tc.server_urls) > 0, "teacher.server_urls",
             list(tc.server_urls), "one http(s):// address or more with teacher.backend=vllm_server")
    for url in tc.server_urls:
        _require(url.startswith(("http://", "https://")), "teacher.server_urls", url, "http(s):// addresses")
    _require(tc.timeout_s > 0, "teacher.timeout_s", tc.timeout_s, "a number > 0")
    _require(tc.retries >= 0, "teacher.retries", tc.retries, "an integer >= 0")
    _require(tc.request_rows >= 0, "teacher.request_rows", tc.request_rows, "an integer >= 0 (0: a whole share)")
    _choice("serve.role", cfg.serve.role, ("student", "teacher"))
    _require(cfg.serve.role == "student" or bool(cfg.serve.url or tc.server_urls), "serve.url",
             cfg.serve.url, "an http(s):// address (or teacher.server_urls) with serve.role=teacher")
    _require(not cfg.serve.url or cfg.serve.url.startswith(("http://", "https://")), "serve.url",
             cfg.serve.url, "an http(s):// address")
    lc = cfg.learner
    _choice("learner.backend", lc.backend, registry.LEARNERS)
    _require(lc.lr > 0, "learner.lr", lc.lr, "a number > 0")
    _require(len(lc.betas) == 2 and all(0 <= b < 1 for b in lc.betas), "learner.betas",
             list(lc.betas), "two numbers in [0, 1)")
    _require(lc.weight_decay >= 0, "learner.weight_decay", lc.weight_decay, "a number >= 0")
    _require(lc.warmup_steps >= 0, "learner.warmup_steps", lc.warmup_steps, "an integer >= 0")
    _require(lc.micro_batch_size >= 1, "learner.micro_batch_size", lc.micro_batch_size,
             "an integer >= 1")
    _require(lc.minibatches >= 1, "learner.minibatches", lc.minibatches, "an integer >= 1")
    _choice("learner.zero_stage", lc.zero_stage, {1, 2, 3})
    _choice("learner.precision", lc.precision, {"fp32", "bf16"})
    if lc.backend == "deepspeed":
        if lc.deepspeed_config:
            _require(Path(lc.deepspeed_config).is_file(), "learner.deepspeed_config",
                     lc.deepspeed_config, "null or the path of a DeepSpeed JSON file")
        stage = zero_stage(lc)
        _require(stage != 3 or o.name not in registry.READS_LM_HEAD, "learner.zero_stage",
                 stage, f"1 or 2 with objective.name={o.name} (it reads the LM head "
                 "weight outside the model's forward, which ZeRO-3 partitions)")
        _require(not lc.offload_optimizer or stage >= 1, "learner.offload_optimizer",
                 lc.offload_optimizer, "false unless learner.zero_stage >= 1")
        _require(stage != 3 or not lc.subspace_constraint, "learner.subspace_constraint",
                 lc.subspace_constraint, "false with learner.zero_stage=3 (its gradients are "
                 "partitioned before a whole-matrix projection could see them)")
    _require(not (lc.packing and lc.backend == "deepspeed" and zero_stage(lc) == 3), "learner.packing",
             lc.packing, "false with ZeRO-3 (the packed forward calls the model's backbone and head "
             "outside the engine's forward)")
    _require(not cfg.teacher.packing or cfg.teacher.backend == "hf", "teacher.packing", cfg.teacher.packing,
             "false unless teacher.backend=hf (a vLLM teacher computes on no padding already)")
    _require(not (lc.backend == "deepspeed" and zero_stage(lc) == 3 and cfg.rollout.backend != "hf")
             or not cfg.diag.every, "diag.every", cfg.diag.every,
             "0 with learner.zero_stage=3 and a vLLM rollout (the whole-weight copy the token "
             "diagnostics read is kept on the CPU there)")
    _require(lc.subspace_k >= 1, "learner.subspace_k", lc.subspace_k, "an integer >= 1")
    _choice("learner.subspace_project", lc.subspace_project, {"gradient", "update"})
    _choice("learner.subspace_rest", lc.subspace_rest, {"train", "freeze", "constrain"})
    _require(lc.subspace_project == "gradient" or lc.backend == "torch", "learner.subspace_project",
             lc.subspace_project, "gradient with learner.backend=deepspeed (its master weights live "
             "in the optimizer, out of reach of a projection of the weights)")
    _require(lc.subspace_project == "gradient" or lc.minibatches == 1, "learner.subspace_project",
             lc.subspace_project, "gradient with learner.minibatches > 1 (the step is projected once "
             "the update is done: a second minibatch would start outside the span)")
    _require(lc.subspace_rest == "train" or lc.subspace_project == "update", "learner.subspace_rest",
             lc.subspace_rest, "train with learner.subspace_project=gradient")
    _require(0 <= lc.subspace_from < 1, "learner.subspace_from", lc.subspace_from, "0 <= x < 1")
    la = cfg.launcher
    _require(la.nproc_per_node >= 1, "launcher.nproc_per_node", la.nproc_per_node, "an integer >= 1")
    _require(la.nnodes >= 1, "launcher.nnodes", la.nnodes, "an integer >= 1")
    _require(0 <= la.node_rank < la.nnodes, "launcher.node_rank", la.node_rank,
             f"an integer in 0 .. launcher.nnodes - 1 = {la.nnodes - 1}")
    _require(1 <= la.master_port <= 65535, "launcher.master_port", la.master_port, "a port 1..65535")
    _choice("launcher.dist_backend", la.dist_backend, {"auto", "nccl", "gloo"})
    world = la.nproc_per_node * la.nnodes
    _require(world == 1 or r.backend != "vllm_server", "rollout.backend", r.backend,
             "hf or vllm with several ranks (one vllm_server serves one training process)")
    _require(world == 1 or lc.backend != "torch", "learner.backend", lc.backend,
             "deepspeed when launcher.nproc_per_node * launcher.nnodes > 1")
    _require(cfg.data.prompts_per_step % world == 0, "data.prompts_per_step",
             cfg.data.prompts_per_step, f"a multiple of the number of ranks ({world})")
    total = sequences_per_rank(cfg, world)
    _require(total % lc.minibatches == 0, "learner.minibatches", lc.minibatches,
             f"a divisor of data.prompts_per_step / ranks * rollout.n = {total}")
    d = cfg.data
    _choice("data.source", d.source, {"toy", "hub", "file"})
    _require(d.prompts_per_step >= 1, "data.prompts_per_step", d.prompts_per_step, "an integer >= 1")
    if d.source == "toy":
        _require(len(d.levels) > 0 and set(d.levels) <= set(range(1, 7)), "data.levels",
                 list(d.levels), "a non-empty list of levels from 1..6")
        _require(d.pool_size >= d.prompts_per_step, "data.pool_size", d.pool_size,
                 "an integer >= data.prompts_per_step")
    elif d.source == "hub":
        _require(bool(d.name), "data.name", d.name, "a dataset id when data.source=hub")
    else:
        _require(bool(d.path) and Path(d.path).is_file() and d.path.endswith((".jsonl", ".parquet")),
                 "data.path", d.path, "an existing .jsonl or .parquet file when data.source=file")
    e = cfg.eval
    _require(e.k >= 1, "eval.k", e.k, "an integer >= 1")
    _require(e.every >= 0, "eval.every", e.every, "an integer >= 0")
    _require(e.max_problems >= 0, "eval.max_problems", e.max_problems, "an integer >= 0 (0 = all)")
    _choice("logger.mode", cfg.logger.mode, {"auto", "online", "offline", "disabled"})
    pc = cfg.prompts
    _choice("prompts.name", pc.name, {"all", "teacher_aligned"})
    _choice("prompts.dedup", pc.dedup, {"none", "exact", "near"})
    _choice("prompts.template", pc.template, {"student", "teacher"})
    _choice("prompts.content", pc.content, {"data", "teacher"})
    _require(pc.content == "data" or cfg.data.source == "toy" or pc.teacher_data,
             "prompts.teacher_data", pc.teacher_data,
             "a .jsonl / .parquet file of the teacher's training prompts (prompts.content=teacher "
             "outside the toy world)")
    _choice("prompts.score", pc.score, {"none", "pass_rate", "overlap"})
    _require(0 < pc.keep_fraction <= 1, "prompts.keep_fraction", pc.keep_fraction, "0 < x <= 1")
    _require(0 <= pc.unaligned_fraction < 1, "prompts.unaligned_fraction",
             pc.unaligned_fraction, "0 <= x < 1")
    _require(pc.samples >= 1, "prompts.samples", pc.samples, "an integer >= 1")
    _require(pc.k >= 1, "prompts.k", pc.k, "an integer >= 1")
    _require(pc.max_prompts >= 0, "prompts.max_prompts", pc.max_prompts, "an integer >= 0")
    sc = cfg.schedule
    _choice("schedule.name", sc.name, {"none", "cold_start"})
    _require(sc.cold_start_steps >= 1, "schedule.cold_start_steps", sc.cold_start_steps,
             "an integer >= 1")
    _require(sc.cold_start_lr is None or sc.cold_start_lr > 0, "schedule.cold_start_lr",
             sc.cold_start_lr, "null (learner.lr) or a number > 0")
    _require(0 <= sc.cold_start_warmup_ratio <= 1, "schedule.cold_start_warmup_ratio",
             sc.cold_start_warmup_ratio, "a share of the cold-start steps in [0, 1]")
    _choice("schedule.cold_start_decay", sc.cold_start_decay, {"cosine", "constant"})
    _require(sc.name != "cold_start" or cfg.learner.minibatches == 1, "learner.minibatches",
             cfg.learner.minibatches, "1 with schedule=cold_start (its schedule counts one optimizer "
             "step per step; a cold-start step's traces vary in number)")
    _require(sc.cold_start_prompts >= 0, "schedule.cold_start_prompts", sc.cold_start_prompts,
             "0 (data.prompts_per_step) or an integer >= 1")
    _require(sc.max_retries >= 0, "schedule.max_retries", sc.max_retries, "an integer >= 0")
    _require(sc.name == "none" or cfg.learner.backend == "torch", "schedule.name", sc.name,
             "none with learner.backend=deepspeed (a cold-start step holds one trace per prompt, "
             "DeepSpeed's accumulation is sized for rollout.n per prompt)")
    validate_teachers(cfg)
    dg = cfg.diag
    for key in ("every", "param_every", "grad_sequences"):
        _require(dg[key] >= 0, f"diag.{key}", dg[key], "an integer >= 0 (0 = off)")
    for key in ("k", "grad_micro", "param_k", "mask_rank"):
        _require(dg[key] >= 1, f"diag.{key}", dg[key], "an integer >= 1")
    _require(0 < dg.eta < 1, "diag.eta", dg.eta, "0 < x < 1")
    _require(0 < dg.mask_fraction < 1, "diag.mask_fraction", dg.mask_fraction, "0 < x < 1")
    pr = cfg.probe
    for key in ("prompts", "samples", "early_positions"):
        _require(pr[key] >= 1, f"probe.{key}", pr[key], "an integer >= 1")
    t = cfg.trainer
    _require(t.steps >= 0, "trainer.steps", t.steps, "an integer >= 0")
    _require(t.save_every >= 0, "trainer.save_every", t.save_every, "an integer >= 0")
    _require(t.keep_last >= 1, "trainer.keep_last", t.keep_last, "an integer >= 1")
    _require(t.threads >= 0, "trainer.threads", t.threads, "an integer >= 0 (0 = all cores)")
    _require(t.max_skipped_steps >= 1, "trainer.max_skipped_steps", t.max_skipped_steps,
             "an integer >= 1")
