"""Run in its own process by tests/test_vllm.py: the vLLM teacher against the HF teacher.

    python -m tests.engines.vllm_teacher_probe WORLD_DIR   → prints one JSON line of measurements
"""

import json
import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
K = 8


def main(world: Path) -> dict:
    from opd_exp.core.types import Sampling
    from opd_exp.engines.rollout_hf import HFRollout
    from opd_exp.engines.teacher_hf import HFTeacher
    from opd_exp.engines.teacher_vllm import VLLMTeacher

    tok = AutoTokenizer.from_pretrained(world / "student", padding_side="left")
    student = AutoModelForCausalLM.from_pretrained(world / "student")
    teacher = AutoModelForCausalLM.from_pretrained(world / "teacher")
    prompts = [tok(f"<|im_start|>user\nCompute {a}+{b}.<|im_end|>\n<|im_start|>assistant\n",
                   add_special_tokens=False).input_ids for a, b in ((3, 4), (10, 20), (7, 1))]
    torch.manual_seed(0)
    r = HFRollout(student, tok, {tok.eos_token_id}).generate(prompts, Sampling(n=4, max_new_tokens=24))
    hf = HFTeacher(teacher, micro_batch_size=5, chunk_size=7)
    vl = VLLMTeacher(str(world / "teacher"), "float32", 256, 0.3, max_logprobs=20)
    m = r.response_mask_B_T.bool()
    s_hf, s_vl = hf.score(r, "sampled").logp_B_T, vl.score(r, "sampled").logp_B_T
    k_hf, k_vl = hf.score(r, "topk", K), vl.score(r, "topk", K)
    # the same K tokens in the same order (where no two of the teacher's top-K probabilities tie)
    same_idx = (k_hf.topk_idx_B_T_K == k_vl.topk_idx_B_T_K).all(-1)[m]
    return {"positions": int(m.sum()),
            "sampled_max_diff": (s_hf - s_vl)[m].abs().max().item(),
            "topk_value_max_diff": (k_hf.topk_logq_B_T_K - k_vl.topk_logq_B_T_K)[m].abs().max().item(),
            "topk_same_idx_frac": same_idx.float().mean().item()}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
