"""The schemas of the commands beside `train` (serve, probe, plan): part of the one config
schema (schema.py `Config`), kept apart so the run's groups read on one page."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class ServeConfig:
    """`python -m opd_exp serve`: which model a vLLM server holds, and where it listens."""
    role: str = "student"  # student (rollout=vllm_server; weights pushed by the run) | teacher
    url: str = ""  # "" = rollout.server_url (student) or teacher.server_urls[0] (teacher)
    # GPUs one server spans (vLLM tensor parallelism: a 32B teacher over 4 of a node's GPUs)
    tensor_parallel_size: int = 1
    # share of each of its GPUs the server takes; 0 = rollout.* / teacher.gpu_memory_utilization
    # (shares meant for an engine beside the learner — a server on GPUs of its own: 0.9)
    gpu_memory_utilization: float = 0.0
    # a file (mode 600) holding the shared secret of the run's servers: `serve` guards every path
    # but /health with it, `train` sends it (rollout=vllm_server, teacher=vllm_server); required
    # to serve beyond loopback. "" = the file $OPD_EXP_SERVER_TOKEN_FILE names, else no secret.
    # The path only: the secret itself never goes into a config (opd_exp/engines/server_guard.py)
    token_file: str = ""


@dataclass
class ProbeConfig:
    """`python -m opd_exp probe`: will this pair distil? (opd_exp/commands/probe.py; thresholds
    and how they were chosen: docs/diagnostics.md)."""
    prompts: int = 256  # training prompts sampled (the data.* pool, seeded order)
    samples: int = 4  # answers per prompt: student rollouts and the teacher's pass rate
    early_positions: int = 8  # "early" response positions
    min_overlap_mass: float = 0.8  # teacher mass on the shared top-K, all positions
    min_early_overlap_mass: float = 0.8  # … at early positions
    min_pass_gap: float = 0.2  # teacher pass rate minus the student's on the same prompts
    max_logprob_mismatch: float = 0.01  # sampler vs learner log-probs of the sampled tokens
    min_aligned_share: float = 0.9  # another tokenizer: response tokens that align with the teacher's bytes
    out: Optional[str] = None  # the JSON report; None = probe.json in the working directory


@dataclass
class PlanConfig:
    """The per-GPU memory plan (opd_exp/runtime/memory_plan.py; `python -m opd_exp plan`)."""
    gpu_memory_gib: float = 0.0  # one GPU's memory; 0 = the visible GPU's (none: an 80 GB H100's 79.1)
    prompt_tokens: int = 1024  # the longest prompt the plan allows for (sequence = this + max_new_tokens)
    check: bool = True  # train on a GPU refuses, at start, a run whose plan does not fit
