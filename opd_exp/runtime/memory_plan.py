"""A per-GPU memory plan of a run, before any weight is loaded (`python -m opd_exp plan`, and
`train` at its start on a GPU): what each component holds on one rank's GPU, from each model's
shape (its config.json in a local folder or the local HF cache, else the reference models'
shapes shipped below) and the run's config. A plan, not a measurement: see docs/distributed.md
for what was validated against measured memory (tests/test_memory_plan.py).

Per rank, W ranks, Ψ = the student's parameters:

- weights / gradients / optimizer — torch learner: Ψ·b each for weights and gradients, 2·Ψ·b for
  AdamW's two moments (b = the student dtype's bytes). DeepSpeed (ZeRO paper's accounting):
  fp32 4Ψ + 4Ψ + 8Ψ; bf16 2Ψ + 2Ψ + 12Ψ (fp32 master weights and moments); the optimizer
  partitioned over W from stage 1, the gradients from stage 2, the weights at stage 3; optimizer
  offload moves the optimizer to the CPU.
- activations of one micro-batch of `learner.micro_batch_size` sequences of the longest length
  (prompt budget + `rollout.max_new_tokens`): per token and decoder layer, measured on HF's
  Qwen3 layer with a flash/memory-efficient attention kernel (the attention matrix never kept):
  fp32 24H + 16I + 16Q + 16KV + 8(heads + kv heads) bytes, bf16 16H + 8I + 10Q + 10KV + 8(…)
  (H hidden, I intermediate, Q = heads·head_dim, KV = kv heads·head_dim); with gradient
  checkpointing the layers keep only their inputs (H·b per token and layer) and one layer is
  recomputed at a time.
- the LM head: the head applied a chunk of positions at a time (rows · chunk · V · 4 bytes with at
  most 2²⁵ logits, one position at least, a few live at once) or, where the whole forward is used, [tokens, V] logits in the model dtype, their fp32 copy
  and the log-softmax (b + 8 bytes a logit).
- a colocated vLLM engine: `gpu_memory_utilization` of the GPU (weights, KV cache, its own
  activations); it must hold its weights and a KV cache of at least one `max_model_len` sequence.
- a colocated teacher: HF — its weights and one micro-batch's forward without gradients (one
  layer's activations and the head's chunks); vLLM — its `gpu_memory_utilization` share, plus the
  `prompt_logprobs` temporary that vLLM does not budget: `max_num_batched_tokens` × V × 4 bytes
  for the logits and as much for their log-softmax.
- phases: what is live together while sampling, while the teacher scores and while the learner
  trains (`phases`); the plan is the largest. `rollout.sleep`: the engine releases its memory
  right after generating, so it is absent from the scoring and training phases.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from opd_exp.config.registry import READS_LM_HEAD
from opd_exp.methods.head_logprobs import chunk_positions
from opd_exp.runtime.model_shapes import REFERENCE_SHAPES, Shape, find_shape, shape_from_config  # noqa: F401

GIB = 2**30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
H100_80GB_GIB = 79.1  # what torch reports for an 80 GB H100 (85,031,714,816 bytes)


@dataclass
class Plan:
    gpu_gib: float
    items: dict[str, float] = field(default_factory=dict)  # GiB per rank, by component
    phases: dict[str, list[str]] = field(default_factory=dict)  # items that are live together
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # what cannot work whatever the total
    shrink: dict[str, str] = field(default_factory=dict)  # item → the keys that shrink it

    @property
    def peak_gib(self) -> float:
        return max(sum(self.items[k] for k in ks) for ks in self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda p: sum(self.items[k] for k in self.phases[p]))

    @property
    def headroom(self) -> float:
        return 1.0 - self.peak_gib / self.gpu_gib

    @property
    def fits(self) -> bool:
        return self.peak_gib <= self.gpu_gib and not self.problems

    def table(self) -> str:
        lines = ["| component | GiB per GPU | live in |", "|---|---|---|"]
        for k, v in sorted(self.items.items(), key=lambda kv: -kv[1]):
            where = ", ".join(p for p, ks in self.phases.items() if k in ks)
            lines.append(f"| {k} | {v:.2f} | {where} |")
        lines.append(f"| **peak ({self.peak_phase})** | **{self.peak_gib:.2f}** of {self.gpu_gib:.1f} "
                     f"({self.headroom:.0%} free) | |")
        return "\n".join(lines + [f"- {n}" for n in self.notes + self.problems])

    def refusal(self) -> str | None:
        """One line naming the biggest items of the peak and the keys that shrink them."""
        if self.fits:
            return None
        if self.problems:
            return "memory plan: " + "; ".join(self.problems)
        top = sorted(self.phases[self.peak_phase], key=lambda k: -self.items[k])[:3]
        parts = [f"{k} {self.items[k]:.1f}" + (f" ({self.shrink[k]})" if k in self.shrink else "")
                 for k in top]
        return (f"memory plan: {self.peak_gib:.1f} GiB per GPU at the peak ({self.peak_phase}) > "
                f"{self.gpu_gib:.1f} GiB (plan.gpu_memory_gib): biggest " + ", ".join(parts)
                + "; `python -m opd_exp plan …` prints the whole table")


def sequence_tokens(cfg) -> int:
    """The longest sequence a micro-batch holds: prompt budget + new tokens."""
    return cfg.plan.prompt_tokens + cfg.rollout.max_new_tokens


def micro_batch_tokens(cfg) -> int:
    """The tokens of one micro-batch of `learner.micro_batch_size` longest sequences."""
    return cfg.learner.micro_batch_size * sequence_tokens(cfg)


def learner_state(cfg, s: Shape, W: int) -> dict[str, float]:
    """Weights, gradients and optimizer states per rank, bytes."""
    P, lc = s.params, cfg.learner
    if lc.backend != "deepspeed":
        b = BYTES[cfg.pair.student.dtype]
        return {"student weights": P * b, "student gradients": P * b, "optimizer (AdamW)": 2 * P * b}
    stage = lc.zero_stage
    w, g, o = (2, 2, 12) if lc.precision == "bf16" else (4, 4, 8)
    out = {"student weights": P * w / (W if stage >= 3 else 1),
           "student gradients": P * g / (W if stage >= 2 else 1),
           "optimizer (AdamW)": 0.0 if lc.offload_optimizer else P * o / (W if stage >= 1 else 1)}
    if stage >= 3 and cfg.rollout.backend == "hf":  # HF generate samples from a whole copy
        out["student whole copy (ZeRO-3, HF generate)"] = P * w
    return out


def compute_dtype(cfg) -> str:
    if cfg.learner.backend == "deepspeed" and cfg.learner.precision == "bf16":
        return "bfloat16"
    return cfg.pair.student.dtype


def activation_parts(cfg, s: Shape) -> tuple[float, float]:
    """(bytes kept for the backward over one micro-batch's forward, bytes of the one layer that
    gradient checkpointing recomputes at a time in the backward; 0 without it)."""
    dtype, tokens = compute_dtype(cfg), micro_batch_tokens(cfg)
    per_layer = s.layer_activation_bytes_per_token(dtype)
    outside = tokens * s.outside_layers_bytes_per_token(dtype)
    if cfg.learner.gradient_checkpointing:  # each layer keeps its input hidden states
        return tokens * s.layers * s.hidden * BYTES[dtype] + outside, tokens * per_layer
    return tokens * s.layers * per_layer + outside, 0.0


def activations(cfg, s: Shape, whole_forward: bool) -> dict[str, float]:
    """One micro-batch's activations and its LM-head memory, bytes."""
    dtype, tokens = compute_dtype(cfg), micro_batch_tokens(cfg)
    kept, recomputed = activation_parts(cfg, s)
    if whole_forward:  # [tokens, V] logits, their fp32 copy and the log-softmax
        head = tokens * s.vocab_rows * (BYTES[dtype] + 8)
    else:  # a chunk of positions of micro_batch_size rows at a time (packed hidden states are
        # unpacked first; methods/head_logprobs.py chunk_positions): the vocabulary-wide losses
        # hold a chunk's logits, softmax and gradient at once, the sampled-token head one chunk
        # (its softmax and gradient written over the logits), with no objective.chunk_size cap
        rows, wide = cfg.learner.micro_batch_size, cfg.objective.name in READS_LM_HEAD
        chunk = chunk_positions(rows, s.vocab_rows, cfg.objective.chunk_size if wide else None)
        head = (3 if wide else 1) * min(tokens, rows * chunk) * s.vocab_rows * 4
        # the head's chunks are gone before backward recomputes a checkpointed layer: only what
        # the larger of the two adds counts (tests/test_memory_plan.py, against the peak RSS)
        head = max(0.0, head - recomputed)
    return {"activations (one micro-batch)": kept + recomputed, "LM head (logits or chunks)": head}


def whole_forward_head(cfg) -> bool:
    """Where the learner takes the model's whole forward for the sampled tokens' log-probs: the
    DeepSpeed learner at ZeRO-3 (the engine's forward gathers the partitioned weights)."""
    return cfg.learner.backend == "deepspeed" and cfg.learner.zero_stage >= 3


def make_plan(cfg, gpu_gib: float | None = None) -> Plan:
    """The plan of `cfg` on one of the launcher's ranks, a GPU of `gpu_gib` (default
    plan.gpu_memory_gib, else an 80 GB H100)."""
    W = cfg.launcher.nproc_per_node * cfg.launcher.nnodes
    student = find_shape(cfg.pair.student.path, cfg.pair.student.revision)
    teacher = find_shape(cfg.pair.teacher.path, cfg.pair.teacher.revision)
    plan = Plan(gpu_gib=gpu_gib or cfg.plan.gpu_memory_gib or H100_80GB_GIB)
    learner = {**learner_state(cfg, student, W), **activations(cfg, student, whole_forward_head(cfg))}
    lc = cfg.learner
    if lc.subspace_constraint and (lc.subspace_project == "update" or cfg.diag.param_every):
        # the weights an update starts from, kept over it to project (update) or measure its step
        learner["student whole copy (subspace step)"] = learner["student weights"]
    if cfg.diag.param_every:  # float64 SVDs of one matrix at a time: W_0, W_t, ΔW and factors
        biggest = max(student.hidden * student.intermediate, student.hidden * student.heads * student.head_dim)
        learner["geometry diagnostics (float64 SVD of one matrix)"] = 6 * biggest * 8
    engine = rollout_engine(cfg, student, plan)
    teach = teacher_memory(cfg, teacher, plan)
    plan.items = {k: v / GIB for k, v in {**learner, **engine, **teach}.items()}
    plan.phases = phases(cfg, list(engine), list(teach), list(learner))
    plan.shrink = {
        "activations (one micro-batch)": "learner.gradient_checkpointing=true, learner.micro_batch_size",
        "LM head (logits or chunks)": "learner.zero_stage=2 (the head a chunk at a time), learner.micro_batch_size",
        "optimizer (AdamW)": "learner=deepspeed learner.zero_stage / learner.offload_optimizer=true",
        "student gradients": "learner.zero_stage=2",
        "student weights": "learner.zero_stage=3",
        "vLLM engine (rollouts)": "rollout.gpu_memory_utilization, rollout.sleep=true",
        "teacher weights (HF)": "teacher=vllm_server (the teacher on its own GPUs)",
        "teacher vLLM engine": "teacher.gpu_memory_utilization, teacher=vllm_server",
        "teacher prompt_logprobs temporary": "teacher.max_num_batched_tokens",
    }
    return plan


def phases(cfg, engine: list[str], teach: list[str], learner_only: list[str]) -> dict[str, list[str]]:
    """What is live together in each phase of a step. Always: the student's weights, the
    optimizer, an HF teacher's weights; ZeRO's gradient partitions stay allocated between steps
    (the torch learner frees its gradients). A vLLM engine holds its share until it sleeps
    (`rollout.sleep`: right after generating); a vLLM teacher's engine never sleeps."""
    persistent = ["student weights", "optimizer (AdamW)"] + [k for k in teach if "weights" in k]
    if cfg.learner.backend == "deepspeed":
        persistent.append("student gradients")
    resident_teacher = [k for k in teach if k == "teacher vLLM engine"]
    # HF generate frees its KV cache when it returns; a vLLM engine holds its share unless asleep
    awake_engine = [] if cfg.rollout.backend != "vllm" or cfg.rollout.sleep else engine
    persistent += [k for k in learner_only if k.startswith("student whole copy")]
    learner = ["student gradients", "activations (one micro-batch)", "LM head (logits or chunks)"]
    scoring = [k for k in teach if k not in persistent]
    out = {"sampling": persistent + engine + resident_teacher,
           "teacher scoring": persistent + awake_engine + scoring,
           "training": persistent + awake_engine + resident_teacher + learner}
    geometry = [k for k in learner_only if k.startswith("geometry")]
    if geometry:  # after the update: the weights and ZeRO's partitions, no activations
        out["parameter diagnostics"] = persistent + awake_engine + resident_teacher + geometry
    return {name: list(dict.fromkeys(ks)) for name, ks in out.items()}


def rollout_engine(cfg, s: Shape, plan: Plan) -> dict[str, float]:
    r = cfg.rollout
    if r.backend == "vllm":
        share = r.gpu_memory_utilization * plan.gpu_gib * GIB
        check_engine(plan, "rollout", s, engine_dtype(cfg), share, r.max_model_len or sequence_tokens(cfg))
        return {"vLLM engine (rollouts)": share}
    if r.backend == "hf":  # generate: its KV cache and the last position's logits, no copy of the weights
        b = BYTES[cfg.pair.student.dtype]
        kv = r.batch_size * sequence_tokens(cfg) * s.kv_cache_bytes_per_token(b)
        return {"HF generate KV cache": kv + r.batch_size * s.vocab_rows * 4}
    return {}


def engine_dtype(cfg) -> str:
    return cfg.rollout.dtype or cfg.pair.student.dtype


def check_engine(plan: Plan, who: str, s: Shape, dtype: str, share: float, context: int) -> None:
    b = BYTES[dtype]
    need = s.params * b + context * s.kv_cache_bytes_per_token(b)
    if need > share:
        plan.problems.append(
            f"the {who} vLLM engine's share ({share / GIB:.1f} GiB = {who}.gpu_memory_utilization of "
            f"the GPU) holds less than its weights + one {context}-token sequence's KV cache "
            f"({need / GIB:.1f} GiB); raise {who}.gpu_memory_utilization or lower {who}.max_model_len")
    else:
        plan.notes.append(f"{who} vLLM engine: {s.params * b / GIB:.1f} GiB weights, KV cache for "
                          f"~{int((share - s.params * b) / s.kv_cache_bytes_per_token(b)):,} tokens "
                          f"(at most; less its activations)")


VLLM_DEFAULT_BATCHED_TOKENS = 16384  # vLLM's LLM class on an 80 GB GPU


def teacher_memory(cfg, s: Shape, plan: Plan) -> dict[str, float]:
    t = cfg.teacher
    if t.backend == "hf":
        b, tokens = BYTES[cfg.pair.teacher.dtype], micro_batch_tokens(cfg)
        # no gradient: one layer's states at a time, and the head a chunk of positions at a time
        forward = tokens * (2 * s.hidden + 2 * s.intermediate) * b + 3 * min(tokens, 256) * s.vocab_rows * 4
        return {"teacher weights (HF)": (1 + len(cfg.pair.teachers)) * s.params * b,
                "teacher forward (HF, no grad)": forward}
    if t.backend == "vllm":
        share = t.gpu_memory_utilization * plan.gpu_gib * GIB
        check_engine(plan, "teacher", s, cfg.pair.teacher.dtype, share, t.max_model_len or sequence_tokens(cfg))
        tokens = t.max_num_batched_tokens or VLLM_DEFAULT_BATCHED_TOKENS
        return {"teacher vLLM engine": share, "teacher prompt_logprobs temporary": tokens * s.vocab_rows * 8}
    return {}


def visible_gpu_gib() -> float | None:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB
    return None


CHECKED = "OPD_EXP_PLAN_CHECKED"  # set in the environment of ranks whose launcher checked the plan


def check_fits(cfg, is_main: bool = True) -> Plan | None:
    """`train`'s start: the plan on the GPU it will use (plan.gpu_memory_gib, else the visible
    GPU; none: no check), refused in one line (ConfigError) when it cannot fit."""
    import os

    from opd_exp.config import ConfigError

    gpu = cfg.plan.gpu_memory_gib or visible_gpu_gib()
    if not cfg.plan.check or not gpu or os.environ.get(CHECKED):
        return None  # no GPU to plan for, or checked by the command that launched this rank
    try:
        plan = make_plan(cfg, gpu_gib=gpu)
    except ValueError as e:  # a model whose shape is nowhere offline: no plan, said once
        if is_main:
            print(f"memory plan: skipped ({e})", flush=True)
        return None
    why = plan.refusal()
    if why:
        raise ConfigError(why + " (plan.check=false runs it anyway)")
    if is_main:
        print(f"memory plan: {plan.peak_gib:.1f} of {plan.gpu_gib:.1f} GiB per GPU at the peak "
              f"({plan.peak_phase}), {plan.headroom:.0%} free", flush=True)
    return plan
