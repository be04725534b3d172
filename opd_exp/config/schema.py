"""The config schema: every default lives here, once. YAML under conf/ holds only changes.

Each dataclass is the schema of one config group (conf/<group>/*.yaml); Hydra merges the YAML
into it, so an unknown key or a wrongly typed value fails at composition. `validate`
(opd_exp/config/validate.py) then checks ranges and names and raises `ConfigError` with one line
naming the field and what is allowed. Names of backends, objectives and rewards: registry.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from opd_exp.config.schema_commands import PlanConfig, ProbeConfig, ServeConfig


@dataclass
class ModelConfig:
    path: str = MISSING  # hub id, local folder, or toy:<name> for a toy-world model
    dtype: str = "float32"  # float32 | bfloat16 | float16
    revision: Optional[str] = None
    trust_remote_code: bool = False
    # the model's own prompt rendering: extra chat-template variables (Qwen3:
    # {enable_thinking: false}) and an optional system message before the user prompt
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    system_prompt: Optional[str] = None


@dataclass
class PairConfig:
    name: str = "toy"
    student: ModelConfig = field(default_factory=lambda: ModelConfig(path="toy:student"))
    teacher: ModelConfig = field(default_factory=lambda: ModelConfig(path="toy:teacher"))
    # prompt the teacher scores (and samples) under: the student's rendering, or its own
    # (pair.teacher's chat template, chat_template_kwargs and system_prompt); the response
    # tokens are the same either way
    teacher_prompt: str = "student"  # student | own
    # multi-teacher OPD: more teachers by name (each built like pair.teacher, same teacher.backend,
    # its own template), and routes: a prompt's tag (toy: its level "L1".."L6"; data.tag_field)
    # → the name of the teacher that scores it; an unrouted tag goes to pair.teacher, named "main"
    teachers: dict[str, ModelConfig] = field(default_factory=dict)
    routes: dict[str, str] = field(default_factory=dict)


@dataclass
class XTokConfig:
    """A teacher whose tokenizer differs from the student's (methods/xtok.py): the sampled-token
    objectives compare chunks of the same bytes; this says where a chunk's reward goes."""
    credit: str = "last"  # last | uniform | surprisal (each student token's −log p share)
    # objective=topk across tokenizers: lsm (local support matching on the byte-prefix map) |
    # uld | uld_hybrid (TRL GOLD's sorted-L1 ablations, methods/uld.py)
    loss: str = "lsm"


@dataclass
class RewardConfig:
    """Per-token (or sequence) reward of the sampled-token estimator (SPEC §1.2)."""
    name: str = "log_ratio"  # see config/registry.py REWARDS
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
    name: str = "sampled_token"  # see config/registry.py OBJECTIVES
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
    chunk_size: int = 64  # at most this many positions per LM-head chunk for vocabulary-wide work, and
    # fewer where [rows, positions, V] would pass 2²⁵ logits (a real vocabulary; docs/benchmarks.md)
    rollouts_from: str = "student"  # student (on-policy) | teacher (off-policy; sft)
    special_mask: bool = False  # mask the first occurrence of each mask_strings string
    # matched as text: one token where the tokenizer writes the string as one, else its pieces
    mask_strings: list[str] = field(default_factory=lambda: ["<think>", "</think>", "<|im_end|>"])
    mask_stop_token: bool = True  # with special_mask: also never train on the stop token
    # tokenizers that differ: never train on the student token ids the teacher's tokenizer does
    # not share (sampled_token, sft); without it a mismatch is an error (SPEC §1.6)
    mask_unshared: bool = False


@dataclass
class RolloutConfig:
    backend: str = "hf"  # see config/registry.py ROLLOUTS
    n: int = 4  # samples per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off (HF generate's own default of 50 is never used)
    max_new_tokens: int = 96
    batch_size: int = 256  # sequences generated at once (hf)
    sync_every: int = 1  # vllm: push learner weights to the engine every this many steps
    # vllm: how they get there: memory (the tensors handed to the in-process engine's
    # reload_weights, no file) | disk (written to <run>/vllm_weights/, then reloaded from there)
    weight_sync: str = "memory"
    max_model_len: int = 0  # vllm: context length of the engine; 0 = the model's own
    gpu_memory_utilization: float = 0.3  # vllm on GPU: share of memory for the engine
    # vllm: the engine's KV cache in MiB (its kv_cache_memory_bytes); 0 = the engine decides
    # (CPU: VLLM_CPU_KVCACHE_SPACE GiB, which wins when set; GPU: gpu_memory_utilization)
    kv_cache_mib: int = 0
    sleep: bool = False  # vllm on GPU: engine asleep (memory freed) while the learner trains
    # vllm: eager mode — the engine starts in seconds (tests, short CPU runs); false: vLLM
    # compiles the model (torch.compile; CUDA graphs on GPU) at start, then decodes faster
    enforce_eager: bool = True
    is_cap: float = 0.0  # > 0: weight sampled-token advantages by min(p_learner / p_rollout, is_cap)
    # 1: step t+1's rollouts are sampled (from the weights before update t) while step t trains —
    # one-step-off-policy, loop/ahead.py; 0: every step samples from its own weights (exact resume)
    max_staleness: int = 0
    # with max_staleness=1: special-token masking and the teacher also score step t+1's rollouts
    # in the background, right after sampling them (false: in step t+1's foreground). No faster
    # than false on the toy CPU benchmark (docs/benchmarks.md); the next step's teacher scores
    # and the teacher's activations are then in memory while the learner trains
    score_ahead: bool = False
    server_url: str = "http://127.0.0.1:8000"  # vllm_server: the server `python -m opd_exp serve` runs
    # vllm: the engine's dtype; "" = pair.student.dtype (a bf16 engine for an fp32 student: half the
    # memory, FlashAttention; the log-prob mismatch is logged, rollout.is_cap corrects it)
    dtype: str = ""
    # vllm: tokens per engine step and sequences in flight; 0 = vLLM's defaults (GPU: 16,384 / 1,024
    # for the LLM class on an 80 GB card). Lower them to bound the engine's activations.
    max_num_batched_tokens: int = 0
    max_num_seqs: int = 0


@dataclass
class TeacherConfig:
    """How the teacher scores rollouts (opd_exp/engines/teacher_*.py); the model is pair.teacher."""
    # hf (forward pass; every objective) | vllm (prompt log-probs: sampled, topk) | vllm_server
    # (the same from separately started servers: `python -m opd_exp serve serve.role=teacher`)
    backend: str = "hf"
    max_model_len: int = 0  # vllm: context length of the engine; 0 = the model's own
    gpu_memory_utilization: float = 0.3  # vllm on GPU: share of memory for the engine
    server_urls: list[str] = field(default_factory=list)  # vllm_server: replicas of the teacher
    timeout_s: float = 600.0  # vllm_server: per request
    retries: int = 3  # vllm_server: per request and replica, before the request goes to the next
    request_rows: int = 32  # vllm_server: sequences per request (0 = a replica's whole share)
    # vllm_server: the name the servers serve pair.teacher under (checked at start against each
    # replica's model id and path); "" = pair.teacher.path's last part
    served_model: str = ""
    # vllm: tokens per engine step; each step's prompt_logprobs hold [tokens, V] float32 logits and
    # their log-softmax outside the engine's memory share (the plan counts them); 0 = vLLM's default
    max_num_batched_tokens: int = 0
    # a folder for teacher scores of sequences that do not change with training (prompt selection),
    # content-addressed and shared by a sweep's runs (opd_exp/runtime/score_cache.py); None = off
    cache_dir: Optional[str] = None
    # hf: pack each micro-batch's real tokens into rows for the teacher's forward, as
    # learner.packing (no compute on padding; the same scores)
    packing: bool = False


@dataclass
class LearnerConfig:
    backend: str = "torch"  # see config/registry.py LEARNERS
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0  # clip the global gradient norm to this (<= 0: no clipping)
    micro_batch_size: int = 64  # sequences per forward/backward
    # pack each micro-batch's real tokens into rows (no compute on padding; same numbers:
    # opd_exp/engines/packing.py)
    packing: bool = False
    minibatches: int = 1  # optimizer steps per rollout batch (> 1: PPO-clipped ratio)
    # recompute each decoder layer's activations in the backward instead of keeping them (HF's
    # gradient checkpointing, non-reentrant): the same loss and gradients, activations ~1 hidden
    # state per token and layer, ~1/3 more compute
    gradient_checkpointing: bool = False
    # deepspeed backend (opd_exp/engines/learner_deepspeed.py)
    zero_stage: int = 2  # ZeRO stage 1 | 2 | 3
    precision: str = "fp32"  # fp32 | bf16 (bf16 weights and compute, fp32 master weights)
    offload_optimizer: bool = False  # optimizer states in CPU memory (ZeRO-Offload)
    deepspeed_config: Optional[str] = None  # a ZeRO JSON of your own; the loop still sets batch keys
    # subspace-constrained training (SPEC §4): from step t0 = subspace_from * trainer.steps on,
    # each weight-matrix gradient g <- g V_K V_K^T, V_K the top-subspace_k right singular vectors
    # of W_t0 - W_0 (embeddings and LM head excluded; not with ZeRO-3)
    subspace_constraint: bool = False
    subspace_k: int = 16
    subspace_from: float = 0.2
    # gradient: project each matrix's gradient (AdamW's per-coordinate scaling then moves the step
    # out of the span: diag/param/outside_span says how far) | update: project each matrix's
    # optimizer step itself, weight decay included (torch learner; one copy of the weights kept
    # over the update)
    subspace_project: str = "gradient"
    # update: embeddings, LM head, norms: train | freeze | constrain (loop/geometry.py says how)
    subspace_rest: str = "train"


@dataclass
class LauncherConfig:
    """Ranks of the job (opd_exp/runtime/launcher.py): torchrun is started underneath when > 1 process."""
    nproc_per_node: int = 1  # processes (GPUs) on this node
    nnodes: int = 1  # nodes in the job
    node_rank: int = 0  # this node's rank, 0 .. nnodes - 1
    master_addr: str = "127.0.0.1"  # node 0's address (torchrun static rendezvous)
    master_port: int = 29500
    dist_backend: str = "auto"  # auto (nccl with CUDA, else gloo) | nccl | gloo


@dataclass
class DataConfig:
    """Training prompts."""
    source: str = "toy"  # toy | hub | file
    prompts_per_step: int = 16
    # toy source
    levels: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5, 6])
    pool_size: int = 4096  # distinct training prompts drawn from the toy task
    # hub source (a datasets-style dataset; downloaded only when a run starts)
    name: Optional[str] = None
    path: Optional[str] = None  # file source: a .jsonl or .parquet file of rows (the fields below)
    subset: Optional[str] = None  # the dataset's configuration name, if it has several
    split: str = "train"
    prompt_field: str = "problem"
    answer_field: str = "answer"
    tag_field: Optional[str] = None  # a row's field that routes it to a teacher (pair.routes)
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
    group: Optional[str] = None  # W&B group: the sweep files (conf/sweep/) put a sweep's runs in one
    tags: list[str] = field(default_factory=list)
    plots: bool = True  # PNG curves in the run dir at the end


@dataclass
class ScheduleConfig:
    """What each step trains on (SPEC §2): `none` = the objective from the first step;
    `cold_start` = SFT on teacher-written traces (rejection-filtered, cached in the run dir) for
    the first `cold_start_steps` steps, then the objective from that state, in the same run."""
    name: str = "none"  # none | cold_start
    cold_start_steps: int = 50
    cold_start_lr: Optional[float] = None  # learning rate of the cold-start steps; None = learner.lr
    # the cold start's own linear warm-up (a share of its steps) and then decay: cosine | constant
    cold_start_warmup_ratio: float = 0.05
    cold_start_decay: str = "cosine"
    # a fresh optimizer (AdamW's moments cleared) at the switch to the objective, whose warm-up
    # (learner.warmup_steps) restarts there
    reset_optimizer: bool = True
    cold_start_prompts: int = 0  # prompts (one trace each) per cold-start step; 0 = data.prompts_per_step
    max_retries: int = 3  # a prompt whose trace is rejected is sampled again up to this often
    filter: bool = True  # the rejection filter of SPEC §2 (opd_exp/recipes/rejection.py)


@dataclass
class PromptsConfig:
    """Which training prompts (SPEC §2), applied to the `data.*` pool before training:
    de-duplication, then teacher-aligned selection — (a) `template`, (b) `content`, (c) `score`
    (opd_exp/recipes/prompt_selection.py; the scores are cached in the run dir and logged)."""
    name: str = "all"  # all | teacher_aligned
    dedup: str = "exact"  # none | exact | near (also case, spacing and end-punctuation variants)
    # (a) the prompt rendering the student trains and samples under: its own, or the teacher's
    # chat template, chat_template_kwargs and system prompt (as text, encoded by the student)
    template: str = "student"  # student | teacher
    # (b) draw the prompts from the teacher's training distribution: a file of its prompts
    # (teacher_data), or in the toy world the levels the teacher was trained on
    content: str = "data"  # data | teacher
    teacher_data: Optional[str] = None  # content=teacher on real pairs: a .jsonl / .parquet file
    # (c) keep the top keep_fraction of the pool by a score computed before training
    score: str = "none"  # none | pass_rate (teacher's, over `samples`) | overlap (top-`k`)
    keep_fraction: float = 0.5
    unaligned_fraction: float = 0.0  # share of the kept pool drawn back from the rest (seeded)
    samples: int = 4  # pass_rate: teacher samples per prompt
    k: int = 16  # overlap: |TopK(p) ∩ TopK(q)| / k on one student rollout per prompt
    max_prompts: int = 0  # > 0: the pool is its first N prompts in the seeded order, scored; 0 = all


@dataclass
class DiagConfig:
    """Diagnostics while training (SPEC §4; opd_exp/loop/diagnose.py, metrics in docs/metrics.md).
    Token diagnostics on the step's rollouts before the update, parameter-space diagnostics of the
    weights after it against the start weights W_0. They change nothing the run trains on."""
    every: int = 0  # diag/token/* every this many steps; 0 = off
    k: int = 16  # top-K of the overlap metrics
    # per-position gradient norms and micro-batch gradient variance on this many of the rank's
    # sequences, in micro-batches of grad_micro (torch learner); 0 = off (+25-30 % step time at 4,
    # docs/benchmarks.md)
    grad_sequences: int = 0
    grad_micro: int = 2
    param_every: int = 0  # diag/param/* every this many steps; 0 = off
    param_k: int = 16  # top-k singular subspaces: principal angles, subspace locking Sim_K
    eta: float = 1e-3  # bf16-aware update sparsity threshold
    mask_fraction: float = 0.05  # principal / low-magnitude masks: this fraction of the entries
    mask_rank: int = 16  # rank of W_0's reconstruction that defines the principal mask


@dataclass
class TrainerConfig:
    steps: int = 200  # the toy default: ~9 min on 2 CPU cores, evals included
    seed: int = 0
    save_every: int = 50  # 0 = only the final checkpoint
    keep_last: int = 2  # checkpoints kept on disk
    resume: bool = False  # continue from the run dir's latest checkpoint
    overwrite: bool = False  # a fresh run in a run dir that holds one: delete its records first
    allow_config_change: bool = False  # resume although pair/objective/reward/learner/data/… differ
    threads: int = 0  # torch threads; 0 = all cores
    max_skipped_steps: int = 3  # stop after this many steps in a row with a non-finite gradient


@dataclass
class Config:
    pair: PairConfig = field(default_factory=PairConfig)
    xtok: XTokConfig = field(default_factory=XTokConfig)
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
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    diag: DiagConfig = field(default_factory=DiagConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    experiment: Optional[str] = None  # set by +experiment=… files, for the record


# config group → its schema class (every field of Config but `experiment`)
GROUP_SCHEMAS = {f.name: f.default_factory for f in fields(Config) if f.name != "experiment"}


def schema_cfg(overrides: dict | None = None) -> DictConfig:
    """The schema's defaults with `overrides` merged in (typed; unknown keys fail): for scripts
    and tests that build components without Hydra."""
    from omegaconf import OmegaConf

    return OmegaConf.merge(OmegaConf.structured(Config), overrides or {})


def register_configs() -> None:
    """The typed primary schema (conf/config.yaml's first default) types every group; no group
    entry is stored, so Hydra lists only the YAML options of a group."""
    ConfigStore.instance().store(name="opd_schema", node=Config)


def sequences_per_rank(cfg, world_size: int) -> int:
    """Rollouts each rank trains on per step (prompts are sharded over the ranks)."""
    return cfg.data.prompts_per_step // world_size * cfg.rollout.n
