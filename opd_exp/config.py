"""Structured config: every default lives here, once. YAML under conf/ holds only changes.

Each dataclass is the schema of one config group (conf/<group>/*.yaml); Hydra merges the YAML
into it, so an unknown key or a wrongly typed value fails at composition. `validate` then checks
ranges and names and raises `ConfigError` with one line naming the field and what is allowed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig


class ConfigError(ValueError):
    """A config value that is not allowed; the message is one line naming the field."""


@dataclass
class ModelConfig:
    path: str = MISSING  # hub id, local folder, or toy:<name> for a toy-world model
    dtype: str = "float32"  # float32 | bfloat16 | float16
    revision: Optional[str] = None
    trust_remote_code: bool = False


@dataclass
class PairConfig:
    name: str = "toy"
    student: ModelConfig = field(default_factory=lambda: ModelConfig(path="toy:student"))
    teacher: ModelConfig = field(default_factory=lambda: ModelConfig(path="toy:teacher"))


@dataclass
class RewardConfig:
    """Per-token (or sequence) reward of the sampled-token estimator (SPEC §1.2)."""
    name: str = "log_ratio"  # see opd_exp.rewards.REWARDS
    alpha: float = 1.0  # power: Box-Cox exponent, > 0
    scale_by_alpha: bool = True  # power: divide by alpha (paper) or not (authors' code)
    clip: float = 5.0  # log_clip / log_tanh: c
    eps: float = 1e-6  # zscore / verifiable: added to the std
    std_normalize: bool = True  # verifiable: divide the group advantage by the group std
    mix_lambda: float = 0.5  # mix: A = lambda * A_OPD + (1 - lambda) * A_RLVR
    early_positions: int = 8  # reward/early_min is the min over the first positions


@dataclass
class ObjectiveConfig:
    """What the learner minimises (SPEC §1)."""
    name: str = "sampled_token"  # see opd_exp.objectives.OBJECTIVES
    gamma: float = 0.0  # sampled_token reward-to-go discount: 0 token-level, 1 sequence-level
    clip_eps: float = 0.2  # PPO ratio clip [1 - clip_eps, 1 + clip_eps_high]
    clip_eps_high: Optional[float] = None  # None = clip_eps (RLVR recipes use 0.28)
    divergence: str = "reverse_kl"  # full_vocab / topk analytic: reverse_kl | forward_kl | jsd
    beta: float = 0.5  # jsd mixture weight, TRL's convention: 0 = forward KL, 1 = reverse KL
    k: int = 32  # topk: support size
    support: str = "teacher"  # topk: teacher | student | intersection | union (top-k sets)
    renormalize: bool = True  # topk: softmax over the support (false: raw probabilities)
    gradient: str = "analytic"  # topk: analytic | pg (policy gradient over the K candidates)
    weight: str = "student"  # topk pg weights: student | teacher | uniform
    chunk_size: int = 64  # positions per LM-head chunk for vocabulary-wide work (docs/benchmarks.md)
    rollouts_from: str = "student"  # student (on-policy) | teacher (off-policy; sft)
    special_mask: bool = False  # mask the first occurrence of each mask_strings token
    mask_strings: list[str] = field(default_factory=lambda: ["<", "think", "<|im_end|>"])
    mask_stop_token: bool = True  # with special_mask: also never train on the stop token


@dataclass
class RolloutConfig:
    backend: str = "hf"  # see opd_exp.rollout.BACKENDS
    n: int = 4  # samples per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off (HF generate's own default of 50 is never used)
    max_new_tokens: int = 96
    batch_size: int = 256  # sequences generated at once (hf)
    sync_every: int = 1  # vllm: push learner weights to the engine every this many steps
    max_model_len: int = 0  # vllm: context length of the engine; 0 = the model's own
    gpu_memory_utilization: float = 0.3  # vllm on GPU: share of memory for the engine
    sleep: bool = False  # vllm on GPU: engine asleep (memory freed) while the learner trains
    is_cap: float = 0.0  # > 0: weight sampled-token advantages by min(p_learner / p_rollout, is_cap)
    server_url: str = "http://127.0.0.1:8000"  # vllm_server: the server `python -m opd_exp serve` runs


@dataclass
class TeacherConfig:
    """How the teacher scores rollouts (opd_exp/teacher.py); the model is pair.teacher."""
    backend: str = "hf"  # hf (forward pass; every objective) | vllm (prompt log-probs: sampled, topk)
    max_model_len: int = 0  # vllm: context length of the engine; 0 = the model's own
    gpu_memory_utilization: float = 0.3  # vllm on GPU: share of memory for the engine


@dataclass
class LearnerConfig:
    backend: str = "torch"  # see opd_exp.learner.BACKENDS
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0  # clip the global gradient norm to this (<= 0: no clipping)
    micro_batch_size: int = 64  # sequences per forward/backward
    minibatches: int = 1  # optimizer steps per rollout batch (> 1: PPO-clipped ratio)
    # deepspeed backend (opd_exp/learner_deepspeed.py)
    zero_stage: int = 2  # ZeRO stage 1 | 2 | 3
    precision: str = "fp32"  # fp32 | bf16 (bf16 weights and compute, fp32 master weights)
    offload_optimizer: bool = False  # optimizer states in CPU memory (ZeRO-Offload)
    deepspeed_config: Optional[str] = None  # a ZeRO JSON of your own; the loop still sets batch keys


@dataclass
class LauncherConfig:
    """Ranks of the job (opd_exp/launcher.py): torchrun is started underneath when > 1 process."""
    nproc_per_node: int = 1  # processes (GPUs) on this node
    nnodes: int = 1  # nodes in the job
    node_rank: int = 0  # this node's rank, 0 .. nnodes - 1
    master_addr: str = "127.0.0.1"  # node 0's address (torchrun static rendezvous)
    master_port: int = 29500
    dist_backend: str = "auto"  # auto (nccl with CUDA, else gloo) | nccl | gloo


@dataclass
class DataConfig:
    """Training prompts."""
    source: str = "toy"  # toy | hub
    prompts_per_step: int = 16
    # toy source
    levels: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5, 6])
    pool_size: int = 4096  # distinct training prompts drawn from the toy task
    # hub source (a datasets-style dataset; downloaded only when a run starts)
    name: Optional[str] = None
    subset: Optional[str] = None  # the dataset's configuration name, if it has several
    split: str = "train"
    prompt_field: str = "problem"
    answer_field: str = "answer"
    prompt_suffix: str = ""  # appended to each prompt (e.g. a boxed-answer instruction)
    chat_template: bool = True  # wrap prompts in the student tokenizer's chat template


@dataclass
class EvalConfig:
    benchmarks: list[str] = field(default_factory=lambda: [f"toy_L{i}" for i in range(1, 7)])
    k: int = 8  # samples per problem: Avg@k and Pass@k
    max_problems: int = 0  # per benchmark; 0 = all
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 96
    every: int = 50  # optimizer steps between evals (and at step 0 and the end); 0 = never
    teacher: bool = True  # measure the teacher once per run (logged as teacher/eval/...)
    # hub benchmarks
    prompt_suffix: str = ""


@dataclass
class LoggerConfig:
    mode: str = "auto"  # auto (online if WANDB_API_KEY is set, else offline) | online | offline | disabled
    project: str = "opd_exp"
    entity: Optional[str] = None
    name: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    plots: bool = True  # PNG curves in the run dir at the end


@dataclass
class TrainerConfig:
    steps: int = 200  # the toy default: ~9 min on 2 CPU cores, evals included
    seed: int = 0
    save_every: int = 50  # 0 = only the final checkpoint
    keep_last: int = 2  # checkpoints kept on disk
    resume: bool = False  # continue from the run dir's latest checkpoint
    threads: int = 0  # torch threads; 0 = all cores


@dataclass
class Config:
    pair: PairConfig = field(default_factory=PairConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    experiment: Optional[str] = None  # set by +experiment=… files, for the record


GROUP_SCHEMAS = {"pair": PairConfig, "reward": RewardConfig, "objective": ObjectiveConfig,
                 "rollout": RolloutConfig, "teacher": TeacherConfig, "learner": LearnerConfig, "data": DataConfig,
                 "eval": EvalConfig, "logger": LoggerConfig, "trainer": TrainerConfig,
                 "launcher": LauncherConfig}


def schema_cfg(overrides: dict | None = None) -> DictConfig:
    """The schema's defaults with `overrides` merged in (typed; unknown keys fail): for scripts
    and tests that build components without Hydra."""
    from omegaconf import OmegaConf

    return OmegaConf.merge(OmegaConf.structured(Config), overrides or {})


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="opd_schema", node=Config)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=group, name=f"{group}_schema", node=schema)


def sequences_per_rank(cfg, world_size: int) -> int:
    """Rollouts each rank trains on per step (prompts are sharded over the ranks)."""
    return cfg.data.prompts_per_step // world_size * cfg.rollout.n


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


# ---------------------------------------------------------------------------------------------
# validation: one line per problem, naming the field and what is allowed

def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def _choice(key: str, value: Any, choices) -> None:
    _require(value in choices, key, value, "one of " + ", ".join(map(str, sorted(choices))))


def validate(cfg: DictConfig) -> None:
    """Check ranges and names; raise ConfigError on the first bad field."""
    from opd_exp import learner, objectives, rewards, rollout, teacher  # registries

    for who in ("student", "teacher"):
        m = cfg.pair[who]
        _require(bool(m.path), f"pair.{who}.path", m.path, "a hub id, a folder or toy:<name>")
        _choice(f"pair.{who}.dtype", m.dtype, {"float32", "bfloat16", "float16"})
    rw = cfg.reward
    _choice("reward.name", rw.name, rewards.REWARDS)
    _require(rw.alpha > 0, "reward.alpha", rw.alpha, "a number > 0")
    _require(rw.clip > 0, "reward.clip", rw.clip, "a number > 0")
    _require(rw.eps > 0, "reward.eps", rw.eps, "a number > 0")
    _require(0 <= rw.mix_lambda <= 1, "reward.mix_lambda", rw.mix_lambda, "0 <= mix_lambda <= 1")
    _require(rw.early_positions >= 1, "reward.early_positions", rw.early_positions, "an integer >= 1")
    o = cfg.objective
    _choice("objective.name", o.name, objectives.OBJECTIVES)
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
    r = cfg.rollout
    _choice("rollout.backend", r.backend, rollout.BACKENDS)
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
    if r.sleep:
        import torch

        _require(torch.cuda.is_available(), "rollout.sleep", r.sleep,
                 "false on a machine without CUDA (vLLM sleep mode is GPU only)")
    _require(r.server_url.startswith(("http://", "https://")), "rollout.server_url", r.server_url,
             "an http(s):// address")
    _require(r.is_cap == 0 or r.is_cap >= 1, "rollout.is_cap", r.is_cap, "0 (off) or a number >= 1")
    _require(r.max_model_len >= 0, "rollout.max_model_len", r.max_model_len, "an integer >= 0")
    _require(0 < r.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization",
             r.gpu_memory_utilization, "0 < x <= 1")
    tc = cfg.teacher
    _choice("teacher.backend", tc.backend, teacher.BACKENDS)
    needs = objectives.OBJECTIVES[o.name](cfg).teacher_needs
    _require(needs in teacher.NEEDS_BY_BACKEND[tc.backend], "teacher.backend", tc.backend,
             f"hf with objective.name={o.name}, objective.support={o.support} (it needs the "
             f"teacher's {needs} scores, which only the HF forward gives)")
    _require(tc.max_model_len >= 0, "teacher.max_model_len", tc.max_model_len, "an integer >= 0")
    _require(0 < tc.gpu_memory_utilization <= 1, "teacher.gpu_memory_utilization",
             tc.gpu_memory_utilization, "0 < x <= 1")
    lc = cfg.learner
    _choice("learner.backend", lc.backend, learner.BACKENDS)
    _require(lc.lr > 0, "learner.lr", lc.lr, "a number > 0")
    _require(all(0 <= b < 1 for b in lc.betas), "learner.betas", list(lc.betas), "two numbers in [0, 1)")
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
        _require(stage != 3 or o.name not in ("full_vocab", "topk"), "learner.zero_stage",
                 stage, f"1 or 2 with objective.name={o.name} (it reads the LM head "
                 "weight outside the model's forward, which ZeRO-3 partitions)")
        _require(not lc.offload_optimizer or stage >= 1, "learner.offload_optimizer",
                 lc.offload_optimizer, "false unless learner.zero_stage >= 1")
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
    _choice("data.source", d.source, {"toy", "hub"})
    _require(d.prompts_per_step >= 1, "data.prompts_per_step", d.prompts_per_step, "an integer >= 1")
    if d.source == "toy":
        _require(len(d.levels) > 0 and set(d.levels) <= set(range(1, 7)), "data.levels",
                 list(d.levels), "a non-empty list of levels from 1..6")
        _require(d.pool_size >= d.prompts_per_step, "data.pool_size", d.pool_size,
                 "an integer >= data.prompts_per_step")
    else:
        _require(bool(d.name), "data.name", d.name, "a dataset id when data.source=hub")
    e = cfg.eval
    _require(e.k >= 1, "eval.k", e.k, "an integer >= 1")
    _require(e.every >= 0, "eval.every", e.every, "an integer >= 0")
    _require(e.max_problems >= 0, "eval.max_problems", e.max_problems, "an integer >= 0 (0 = all)")
    _choice("logger.mode", cfg.logger.mode, {"auto", "online", "offline", "disabled"})
    t = cfg.trainer
    _require(t.steps >= 0, "trainer.steps", t.steps, "an integer >= 0")
    _require(t.save_every >= 0, "trainer.save_every", t.save_every, "an integer >= 0")
    _require(t.keep_last >= 1, "trainer.keep_last", t.keep_last, "an integer >= 1")
    _require(t.threads >= 0, "trainer.threads", t.threads, "an integer >= 0 (0 = all cores)")
