"""Run in its own process by tests/test_vllm_server.py: the teacher server (`teacher=vllm_server`)
against the in-process vLLM teacher (`teacher=vllm`) on the same rollouts.

    python -m tests.engines.vllm_server_teacher_probe WORLD_DIR TEACHER_URL   → one JSON line
    (the servers' secret: the file $OPD_EXP_SERVER_TOKEN_FILE names)
"""

import json
import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
K = 8


def main(world: Path, url: str) -> dict:
    from opd_exp.core.types import Sampling
    from opd_exp.engines.rollout_hf import HFRollout
    from opd_exp.engines.teacher_vllm import VLLMTeacher
    from opd_exp.engines.server_guard import read_token, token_file
    from opd_exp.engines.teacher_vllm_server import VLLMServerTeacher

    tok = AutoTokenizer.from_pretrained(world / "student", padding_side="left")
    student = AutoModelForCausalLM.from_pretrained(world / "student")
    prompts = [tok(f"<|im_start|>user\nCompute {a}+{b}.<|im_end|>\n<|im_start|>assistant\n",
                   add_special_tokens=False).input_ids for a, b in ((3, 4), (10, 20), (7, 1))]
    torch.manual_seed(0)
    r = HFRollout(student, tok, {tok.eos_token_id}).generate(prompts, Sampling(n=4, max_new_tokens=24))
    local = VLLMTeacher(str(world / "teacher"), "float32", 256, 0.3, max_logprobs=20, vocab_size=len(tok))
    server = VLLMServerTeacher([url, url], 120, 1, len(tok), len(tok),  # two "replicas": split batch
                               token=read_token(token_file()))
    m = r.response_mask_B_T.bool()
    s_l, s_s = local.score(r, "sampled").logp_B_T, server.score(r, "sampled").logp_B_T
    k_l, k_s = local.score(r, "topk", K), server.score(r, "topk", K)
    return {"positions": int(m.sum()),
            "sampled_max_diff": (s_l - s_s)[m].abs().max().item(),
            "topk_value_max_diff": (k_l.topk_logq_B_T_K - k_s.topk_logq_B_T_K)[m].abs().max().item(),
            "topk_same_idx": bool(torch.equal(k_l.topk_idx_B_T_K[m], k_s.topk_idx_B_T_K[m]))}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), sys.argv[2])))
