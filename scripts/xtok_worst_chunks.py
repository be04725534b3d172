"""Where the chunk log-ratios of a cross-tokenizer pair come from (docs/results.md, "OPD across
tokenizers"): samples a few task responses from the student (HF generate, temperature 1), scores
them with the teacher in its own tokens and template (engines/teacher_xtok.py, HF teacher) and
prints, per response, its worst chunks (log q(c) − log p(c)), its end chunk and every chunk with
log q(c) < −30.

    python scripts/xtok_worst_chunks.py                                   # toy:qwen25_student
    python scripts/xtok_worst_chunks.py --student <run>/checkpoints/step_000040/student
"""

from __future__ import annotations

import argparse
import random

import torch
from omegaconf import OmegaConf

from opd_exp.core.types import rollouts_from_samples
from opd_exp.engines.hf_models import load_model, load_tokenizer
from opd_exp.engines.hf_policy import HFPolicy
from opd_exp.engines.teacher_hf import HFTeacher
from opd_exp.engines.teacher_xtok import XTokTeacher
from opd_exp.methods.xtok import at_last, chunk_sums
from opd_exp.toyworld import task
from opd_exp.toyworld.qwen_models import render


def model_cfg(path: str):
    return OmegaConf.create({"path": path, "dtype": "float32", "revision": None, "trust_remote_code": False})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--student", default="toy:qwen25_student")
    ap.add_argument("--teacher", default="toy:qwen36_teacher")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    s_tok, t_tok = load_tokenizer(model_cfg(a.student), "student"), load_tokenizer(model_cfg(a.teacher), "teacher")
    student, teacher = load_model(model_cfg(a.student), "student"), load_model(model_cfg(a.teacher), "teacher")
    rng = random.Random(a.seed)
    problems = [task.make_problem(rng, rng.choice(task.LEVELS)) for _ in range(a.rows)]
    s_prompts = [s_tok(render(s_tok, p)[0], add_special_tokens=False).input_ids for p in problems]
    t_prompts = [t_tok(render(t_tok, p)[0], add_special_tokens=False).input_ids for p in problems]
    samples = []
    for ids in s_prompts:
        out = student.generate(torch.tensor([ids]), do_sample=True, max_new_tokens=a.max_new_tokens,
                               temperature=1.0, top_k=0, top_p=1.0, eos_token_id=s_tok.eos_token_id,
                               pad_token_id=s_tok.pad_token_id)
        samples.append([(out[0, len(ids):].tolist(), None)])
    r = rollouts_from_samples(s_prompts, samples, s_tok.pad_token_id, [s_tok.eos_token_id])
    with torch.no_grad():
        logp_B_T = HFPolicy(student, vocab_size=len(s_tok)).token_logprobs(r) * r.response_mask_B_T
    xtok = XTokTeacher(HFTeacher(teacher, 8, 8, len(t_tok)), s_tok, t_tok, {s_tok.eos_token_id})
    s = xtok.score(r.with_prompts(t_prompts, s_tok.pad_token_id), "sampled")
    logp_last = at_last(chunk_sums(logp_B_T, s.chunk_B_T), s.chunk_B_T)  # log p(c) on each chunk's last token
    print("xtok:", {k: round(v, 3) for k, v in s.metrics.items()})
    for b in range(r.size):
        ids = r.response_ids_B_T[b][r.response_mask_B_T[b] > 0].tolist()
        ch, n = s.chunk_B_T[b], len(ids)
        words = lambda c: [s_tok.decode([ids[k]]) for k in range(n) if ch[k].item() == c]  # noqa: E731
        print(f"row {b}: {s_tok.decode(ids)!r}")
        last = [t for t in range(n) if ch[t] >= 0 and (t + 1 == n or ch[t + 1] != ch[t])]
        for t in sorted(last, key=lambda t: (s.logp_B_T[b, t] - logp_last[b, t]).item())[:4]:
            print(f"   chunk {words(ch[t].item())}: log q − log p = {s.logp_B_T[b, t] - logp_last[b, t]:.2f} "
                  f"(log q {s.logp_B_T[b, t]:.2f}, log p {logp_last[b, t]:.2f})")
        if last:
            t = last[-1]
            print(f"   end chunk {words(ch[t].item())}: log q {s.logp_B_T[b, t]:.2f}, log p {logp_last[b, t]:.2f}; "
                  f"log q < −30: {[(words(ch[t].item()), round(s.logp_B_T[b, t].item(), 1)) for t in last if s.logp_B_T[b, t] < -30]}")


if __name__ == "__main__":
    main()
