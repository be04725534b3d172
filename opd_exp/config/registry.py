"""The names the config accepts for each pluggable component, and where each one lives.

Every table maps a name to "module:attr"; `resolve` imports it only when a run builds that
component, so validation knows every backend and objective by name without importing an engine.
Adding an objective or a rollout/teacher/learner backend = one line here + its module
(docs/architecture.md).
"""

from __future__ import annotations

import importlib
import os

OBJECTIVES = {  # objective.name → class(objective_cfg, reward_cfg, temperature, ranks)
    "sampled_token": "opd_exp.methods.sampled_token:SampledTokenOPD",
    "full_vocab": "opd_exp.methods.full_vocab:FullVocabOPD",
    "topk": "opd_exp.methods.topk:TopKOPD",
    "sft": "opd_exp.methods.sft:SFT",
}
ROLLOUTS = {  # rollout.backend → make(cfg, model, tokenizer, stop_ids, work_dir, rank)
    "hf": "opd_exp.engines.rollout_hf:make",
    "vllm": "opd_exp.engines.rollout_vllm:make",
    "vllm_server": "opd_exp.engines.rollout_vllm_server:make",
}
TEACHERS = {  # teacher.backend → make(cfg, tokenizer, stop_ids, device) → (scorer, sampler)
    "hf": "opd_exp.engines.teacher_hf:make",
    "vllm": "opd_exp.engines.teacher_vllm:make",
    "vllm_server": "opd_exp.engines.teacher_vllm_server:make",
}
LEARNERS = {  # learner.backend → make(cfg, model, dist, run_dir, vocab_size)
    "torch": "opd_exp.engines.learner_torch:make",
    "deepspeed": "opd_exp.engines.learner_deepspeed:make",
}
# reward.name (opd_exp/methods/rewards.py); verifiable and mix need the rollouts' correctness
# where a chunk's reward goes when the teacher's tokenizer differs (methods/xtok.py)
XTOK_CREDITS = ("last", "uniform", "surprisal")
XTOK_LOSSES = ("lsm", "uld", "uld_hybrid")  # top-K across tokenizers (methods/uld.py)
REWARDS = ("log_ratio", "power", "log_clip", "log_tanh", "zscore", "verifiable", "mix")

# what an objective asks of the teacher (opd_exp/core/types.py TeacherScores), and what each
# teacher backend can give: hidden states (+ LM head) only come from the HF forward
TEACHER_NEEDS = ("none", "sampled", "topk", "hidden")
NEEDS_BY_TEACHER = {"hf": TEACHER_NEEDS, "vllm": ("none", "sampled", "topk"),
                    "vllm_server": ("none", "sampled", "topk")}
# objectives that apply the student's LM head weight outside the model's forward (not ZeRO-3)
READS_LM_HEAD = ("full_vocab", "topk")


def teacher_needs(objective_cfg) -> str:
    """The teacher scores `objective_cfg` needs: one of TEACHER_NEEDS."""
    if objective_cfg.name == "topk":  # a teacher top-K support needs only the teacher's top-K
        return "topk" if objective_cfg.support == "teacher" else "hidden"
    return {"sampled_token": "sampled", "full_vocab": "hidden", "sft": "none"}[objective_cfg.name]


def vllm_in_process() -> bool:
    """Whether an in-process vLLM engine (`rollout=vllm`, `teacher=vllm`) runs its kernels in this
    process — opd_exp's default (`start_engine` sets VLLM_ENABLE_V1_MULTIPROCESSING=0 unless the
    user chose otherwise) — rather than in vLLM's own engine process."""
    return os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") == "0"


def resolve(spec: str):
    """"package.module:attr" → the attribute (the module is imported now, not before)."""
    module, attr = spec.split(":")
    return getattr(importlib.import_module(module), attr)
