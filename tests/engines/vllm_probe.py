"""Run in its own process by tests/test_vllm.py (vLLM binds threads and keeps global state).

    python -m tests.engines.vllm_probe WORLD_DIR WORK_DIR   → prints one JSON line of measurements
    python -m tests.engines.vllm_probe WORLD_DIR WORK_DIR SERVER_URL     (rollout=vllm_server; the
        secret's file in $OPD_EXP_SERVER_TOKEN_FILE)
    OPD_PROBE_WEIGHT_SYNC=disk python -m tests.engines.vllm_probe …      (rollout.weight_sync)
"""

import copy
import json
import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main(world: Path, work: Path, url: str | None = None) -> dict:
    from opd_exp.config import schema_cfg
    from opd_exp.core.types import Sampling, StepBatch, TeacherScores
    from opd_exp.engines.hf_policy import token_logprobs
    from opd_exp.engines.learner_torch import TorchLearner
    from opd_exp.engines.rollout_vllm import VLLMRollout
    from opd_exp.methods.sampled_token import SampledTokenOPD

    tok = AutoTokenizer.from_pretrained(world / "student")
    student = AutoModelForCausalLM.from_pretrained(world / "student")
    teacher = AutoModelForCausalLM.from_pretrained(world / "teacher")
    if url:
        from opd_exp.engines.rollout_vllm_server import VLLMServerRollout
        from opd_exp.engines.server_guard import read_token, token_file

        engine = VLLMServerRollout(student, url, tok, {tok.eos_token_id}, sync_every=1,
                                   token=read_token(token_file()))
    else:
        engine = VLLMRollout(student, tok, {tok.eos_token_id}, work, "float32", 256, 0.3, 1, seed=0,
                             weight_sync=os.environ.get("OPD_PROBE_WEIGHT_SYNC", "memory"))
    prompts = [tok(f"<|im_start|>user\nCompute {a}+{b}.<|im_end|>\n<|im_start|>assistant\n",
                   add_special_tokens=False).input_ids for a, b in ((3, 4), (10, 20), (7, 1))]
    torch.manual_seed(0)
    r = engine.generate(prompts, Sampling(n=4, max_new_tokens=24))
    m = r.response_mask_B_T
    before = ((token_logprobs(student, r) - r.logp_B_T).abs() * m).max().item()

    # one learner step of sampled-token OPD on these rollouts, then a weight sync
    cfg = schema_cfg({
        "reward": {"name": "log_ratio", "alpha": 1.0, "scale_by_alpha": True, "clip": 5.0,
                   "eps": 1e-6, "std_normalize": True, "mix_lambda": 0.5, "early_positions": 8},
        "objective": {"gamma": 0.0, "clip_eps": 0.2, "clip_eps_high": None},
        "rollout": {"temperature": 1.0},
        "learner": {"lr": 5e-2, "betas": [0.9, 0.98], "weight_decay": 0.0, "warmup_steps": 0,
                    "max_grad_norm": 0.0, "micro_batch_size": 8, "minibatches": 1}})
    old = copy.deepcopy(student)
    learner = TorchLearner(student, cfg.learner)
    obj = SampledTokenOPD(cfg.objective, cfg.reward, cfg.rollout.temperature)
    batch = StepBatch(r, TeacherScores(token_logprobs(teacher, r).detach()))
    batch.logp_old_B_T = learner.logprobs(batch, 1.0)
    batch, _ = obj.prepare(batch)
    learner.update(batch, obj)
    pushed = engine.weights_dir  # the server's: a new folder each push; in process: one folder
    written = (pushed / "model.safetensors").stat().st_mtime_ns
    engine.sync_weights(student)
    now = engine.weights_dir / "model.safetensors"
    rewritten = now.stat().st_mtime_ns != written or (engine.weights_dir != pushed and not pushed.exists())
    r2 = engine.generate(prompts, Sampling(n=4, max_new_tokens=24))
    m2 = r2.response_mask_B_T
    with torch.no_grad():
        after_new = ((token_logprobs(student, r2) - r2.logp_B_T).abs() * m2).max().item()
        after_old = ((token_logprobs(old, r2) - r2.logp_B_T).abs() * m2).max().item()
    stop_ok = all(r.response_ids_B_T[i, int(m[i].sum()) - 1].item() == tok.eos_token_id
                  or int(m[i].sum()) == 24 for i in range(r.size))
    # a batch that needs several scheduling steps (seeded requests used to crash here on CPU)
    big = engine.generate(prompts * 11, Sampling(n=8, max_new_tokens=24))
    return {"big_rows": big.size, "before": before, "after_new": after_new, "after_old": after_old,
            "rows": r.size, "stop_ok": stop_ok, "groups": r.group_B.tolist(), "rewritten": rewritten,
            "after_tokens": r2.response_ids_B_T.tolist(), "after_logp": (r2.logp_B_T * m2).tolist()}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:])))
