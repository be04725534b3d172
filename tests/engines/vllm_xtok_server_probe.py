"""Run in its own process by tests/test_vllm_server.py: a teacher with another tokenizer (the tiny
world's Qwen3.6 teacher for its Qwen3 student) served by `python -m opd_exp serve` against the same
teacher in process (`teacher=vllm`), both read through the chunks of engines/teacher_xtok.py.

    python -m tests.engines.vllm_xtok_server_probe WORLD_DIR TEACHER_URL   → one JSON line
    (the servers' secret: the file $OPD_EXP_SERVER_TOKEN_FILE names)
"""

import json
import os
import random
import sys
from pathlib import Path

import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
K = 8
CONTEXT = 256


def main(world: Path, url: str) -> dict:
    os.environ["OPD_EXP_TOY_DIR"] = str(world)
    from omegaconf import OmegaConf

    from opd_exp.core.types import rollouts_from_samples
    from opd_exp.engines.hf_models import load_tokenizer, model_shape, resolve_path
    from opd_exp.engines.server_guard import read_token, token_file
    from opd_exp.engines.teacher_vllm import VLLMTeacher
    from opd_exp.engines.teacher_vllm_server import VLLMServerTeacher
    from opd_exp.engines.teacher_xtok import XTokTeacher
    from opd_exp.toyworld import task
    from opd_exp.toyworld.qwen_models import render

    def cfg(path):
        return OmegaConf.create({"path": path, "dtype": "float32", "revision": None, "trust_remote_code": False})
    s_tok = load_tokenizer(cfg("toy:qwen3_student"), "pair.student")
    t_cfg = cfg("toy:qwen36_teacher")
    t_tok, rows = load_tokenizer(t_cfg, "pair.teacher"), model_shape(t_cfg, "pair.teacher")[0]
    rng = random.Random(3)
    problems = [task.make_problem(rng, rng.choice(task.LEVELS)) for _ in range(6)]
    s_prompts, t_prompts, samples = [], [], []
    for pr in problems:  # each side's own template; the student's canonical answers as responses
        p, r = render(s_tok, pr)
        s_prompts.append(s_tok(p, add_special_tokens=False).input_ids)
        samples.append([(s_tok(r, add_special_tokens=False).input_ids, None)])
        t_prompts.append(t_tok(render(t_tok, pr)[0], add_special_tokens=False).input_ids)
    r = rollouts_from_samples(s_prompts, samples, s_tok.pad_token_id, [s_tok.eos_token_id])
    r = r.with_prompts(t_prompts, s_tok.pad_token_id)
    most = K + rows - len(t_tok)
    local = VLLMTeacher(resolve_path("toy:qwen36_teacher"), "float32", CONTEXT, 0.3, max_logprobs=most,
                        vocab_size=len(t_tok), rows=rows)
    server = VLLMServerTeacher([url, url], 120, 1, len(t_tok), rows,  # two "replicas": split batch
                               token=read_token(token_file()))
    x_l, x_s = (XTokTeacher(t, s_tok, t_tok, {s_tok.eos_token_id}, max_len=CONTEXT - 1) for t in (local, server))
    s_l, s_s = x_l.score(r, "sampled"), x_s.score(r, "sampled")
    k_l, k_s = x_l.score(r, "topk", K), x_s.score(r, "topk", K)
    ends = s_l.chunk_B_T >= 0
    fin = torch.isfinite(k_l.topk_logq_B_T_K)  # mapped entries (the rest: no student id, -inf)
    first = fin[..., 0]
    return {"positions": int(ends.sum()), "chunks": int(first.sum()),
            "aligned_share": s_l.metrics["xtok/aligned_share"],
            "same_chunks": bool(torch.equal(s_l.chunk_B_T, s_s.chunk_B_T)),
            "sampled_max_diff": (s_l.logp_B_T - s_s.logp_B_T)[ends].abs().max().item(),
            "topk_same_support": bool(torch.equal(fin, torch.isfinite(k_s.topk_logq_B_T_K))),
            "topk_value_max_diff": (k_l.topk_logq_B_T_K - k_s.topk_logq_B_T_K)[fin].abs().max().item(),
            "topk_same_idx": bool(torch.equal(k_l.topk_idx_B_T_K[first], k_s.topk_idx_B_T_K[first]))}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), sys.argv[2])))
