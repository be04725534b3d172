"""How much the token-overlap metrics tell toy pairs apart at each K: the student samples toy_L2/L4/L6
prompts (8 each, T = 1, seed 0), and student and teacher are compared at every visited response position
(opd_exp/diagnostics/tokens.py: overlap ratio, top-1 agreement, overlap masses). The toy's answers are ten
digits: at K = 16 both top-K sets hold them all and the masses saturate near 1 (conf/data/toy.yaml sets
diag.k and prompts.k to 4 from these numbers).

    python scripts/toy_topk_saturation.py [--teachers teacher,teacher_long,teacher_foreign] [--ks 1,2,4,8,16]
"""

from __future__ import annotations

import argparse

import torch

from opd_exp.core.types import Sampling
from opd_exp.data import load_benchmark, make_encoder
from opd_exp.diagnostics.tokens import overlap_exact, summarise
from opd_exp.engines.hf_models import load_model, load_tokenizer
from opd_exp.engines.rollout_hf import HFRollout
from opd_exp.config import schema_cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teachers", default="teacher,teacher_long,teacher_foreign")
    ap.add_argument("--ks", default="1,2,4,8,16")
    ap.add_argument("--per-level", type=int, default=8)
    a = ap.parse_args()
    student_cfg = schema_cfg({"pair": {"student": {"path": "toy:student"}}}).pair.student
    tok = load_tokenizer(student_cfg, "pair.student")
    tok.padding_side = "left"
    student = load_model(student_cfg, "pair.student").eval()
    encode = make_encoder(tok, True)
    problems = [p for level in ("toy_L2", "toy_L4", "toy_L6") for p in load_benchmark(level, a.per_level)]
    torch.manual_seed(0)
    r = HFRollout(student, tok, {tok.eos_token_id}).generate([encode(p.prompt) for p in problems],
                                                            Sampling(n=1, max_new_tokens=96))
    T = r.response_ids_B_T.shape[1]
    P = r.input_ids_B_L.shape[1] - T
    mask = r.response_mask_B_T.bool()
    kw = dict(input_ids=r.input_ids_B_L, attention_mask=r.attention_mask_B_L, position_ids=r.position_ids_B_L)

    def rows(model) -> torch.Tensor:  # log-probs of the next token at each response position: [N, V]
        with torch.no_grad():
            return model(**kw).logits.float().log_softmax(-1)[:, P - 1:P - 1 + T][mask]

    logp = rows(student)
    print(f"{int(mask.sum())} student-visited positions, V = {logp.shape[1]}")
    print("| teacher | K | overlap ratio | top-1 agreement | mass student | mass teacher |")
    print("|---|---|---|---|---|---|")
    for name in a.teachers.split(","):
        teacher_cfg = schema_cfg({"pair": {"teacher": {"path": f"toy:{name}"}}}).pair.teacher
        logq = rows(load_model(teacher_cfg, "pair.teacher").eval())
        for k in map(int, a.ks.split(",")):
            o = summarise(overlap_exact(logp, logq, k))
            print(f"| {name} | {k} | {o['ratio']:.3f} | {o['top1']:.3f} | {o['mass_student']:.3f} | "
                  f"{o['mass_teacher']:.3f} |")


if __name__ == "__main__":
    main()
