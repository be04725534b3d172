"""vLLM on a pair with loud padded embedding rows: rollouts never sample a padded id, and the
teacher's top-K holds K real tokens.

    python -m tests.engines.vllm_padded_probe WORLD WORK      (prints JSON)
"""

import json
import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main(world: Path, work: Path) -> dict:
    from opd_exp.core.types import Sampling
    from opd_exp.engines.rollout_vllm import VLLMRollout
    from opd_exp.engines.teacher_vllm import VLLMTeacher

    tok = AutoTokenizer.from_pretrained(world / "student")
    V = len(tok)
    student = AutoModelForCausalLM.from_pretrained(world / "student")
    engine = VLLMRollout(student, tok, {tok.eos_token_id}, work, "float32", 256, 0.3, 1, seed=0)
    r = engine.generate([[5, 6, 7], [8, 9]], Sampling(n=16, max_new_tokens=16))
    del engine
    rows = AutoModelForCausalLM.from_pretrained(world / "teacher").get_output_embeddings().weight.shape[0]
    teacher = VLLMTeacher(str(world / "teacher"), "float32", 256, 0.3, max_logprobs=20,
                          vocab_size=V, rows=rows)
    top = teacher.score(r, "topk", 8)
    m = r.response_mask_B_T.bool()
    return {"V": V, "rows": rows, "max_sampled": int(r.response_ids_B_T[m].max()),
            "max_topk_id": int(top.topk_idx_B_T_K[m].max()),
            "all_finite": bool(torch.isfinite(top.topk_logq_B_T_K[m]).all())}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), Path(sys.argv[2]))))
