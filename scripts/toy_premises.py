"""The premises the papers' toy comparisons rest on, measured before any accuracy is read
(docs/results.md). Each model of a pair reads the reference answers of toy problems written in
its own style and in the other model's (opd_exp/toyworld/task.py `render`), after its own prompt
(chat template or plain text), and we report per-token negative log-likelihoods:

- on the *result digits* (every step's result and the boxed answer): can the model read the other
  pattern's arithmetic? Premise of a cold start or of a mismatched-pattern pair: each model's loss
  on the other style's result digits near its own style's;
- on all response tokens, and the log-ratio log q − log p (teacher minus student) of the student's
  own style by response position: where a teacher without the student's style puts its tail
  (PowerOPD's premise: informative, the tail at the first positions).

    python scripts/toy_premises.py --student toy:student --teacher toy:teacher_foreign \\
        --student-style chat --teacher-style foreign
    python scripts/toy_premises.py --student toy:base_student --teacher toy:teacher \\
        --student-style base --teacher-style chat
    python scripts/toy_premises.py --student toy:student --teacher toy:teacher_readable \\
        --student-style chat --teacher-style readable
    python scripts/toy_premises.py --student toy:base_student_near --teacher toy:teacher_seen_base \\
        --student-style base_near --teacher-style chat
"""

from __future__ import annotations

import argparse
import re

import torch

from opd_exp.config import schema_cfg
from opd_exp.data import make_encoder
from opd_exp.engines.hf_models import load_model, load_tokenizer
from opd_exp.toyworld import task

RESULT = {"chat": r"=(\d+)\.", "foreign": r"gives (\d+)\.", "base": r"= (\d+)",
          "readable": r"(?:First|Then) \d+[+-]\d+=(\d+)\.", "base_near": r"=(\d+)\."}
BOXED = r"\\boxed\{(\d+)\}"
EDGES = [0, 1, 2, 4, 8, 16, 32, 64, 128]


def load(path: str):
    """(tokenizer, model) of a hub id or `toy:<name>`, through the run's own loader."""
    cfg = schema_cfg({"pair": {"student": {"path": path}}}).pair.student
    return load_tokenizer(cfg, path), load_model(cfg, path).eval()


def scored(tok, net, encode, problem, style: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token NLL of the response [T], result-digit mask [T]) of `problem` rendered in `style`."""
    text = problem.render(style)
    prompt = encode(problem.prompt)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc.input_ids, enc.offset_mapping
    spans = [m.span(1) for pat in (RESULT[style], BOXED) for m in re.finditer(pat, text)]
    digit = torch.tensor([any(a <= s and e <= b for a, b in spans) for s, e in offsets])
    with torch.no_grad():
        logits = net(torch.tensor([prompt + ids])).logits[0].float()
    logp = logits[len(prompt) - 1:-1].log_softmax(-1)
    return -logp.gather(-1, torch.tensor(ids)[:, None])[:, 0], digit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--student", default="toy:student")
    ap.add_argument("--teacher", default="toy:teacher_foreign")
    ap.add_argument("--student-style", default="chat", choices=task.STYLES)
    ap.add_argument("--teacher-style", default="foreign", choices=task.STYLES)
    ap.add_argument("--student-prompt", default="chat", choices=("chat", "plain"))
    ap.add_argument("--teacher-prompt", default="chat", choices=("chat", "plain"))
    ap.add_argument("--problems", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    problems = task.sample_problems(a.seed + 123_457, (1, 2, 3, 4, 5, 6), a.problems)
    models = {"student": (a.student, a.student_style, a.student_prompt),
              "teacher": (a.teacher, a.teacher_style, a.teacher_prompt)}
    nll: dict[tuple[str, str], list[torch.Tensor]] = {}
    print(f"{len(problems)} problems (levels 1-6, seed {a.seed}); per-token NLL in nats")
    print("| model | reads style | result digits | all response tokens |")
    print("|---|---|---|---|")
    for role, (path, own, prompt_kind) in models.items():
        tok, net = load(path)
        encode = make_encoder(tok, prompt_kind == "chat")
        for style in dict.fromkeys((a.student_style, a.teacher_style)):
            rows = [scored(tok, net, encode, p, style) for p in problems]
            nll[role, style] = rows
            digits = torch.cat([x[m] for x, m in rows])
            every = torch.cat([x for x, _ in rows])
            mark = " (own)" if style == own else ""
            print(f"| {role} {path} | {style}{mark} | {digits.mean():.3f} | {every.mean():.3f} |")
    # the log-ratio log q − log p on the student's own style, by response position
    s, t = nll["student", a.student_style], nll["teacher", a.student_style]
    print(f"\nlog q − log p (teacher − student) on the student's {a.student_style} answers, by position:")
    print("| positions | mean | min |")
    print("|---|---|---|")
    for lo, hi in zip(EDGES[:-1], EDGES[1:]):
        vals = torch.cat([(xs - xt)[lo:hi] for (xs, _), (xt, _) in zip(s, t)])
        if vals.numel():
            print(f"| {lo}–{hi - 1} | {vals.mean():.2f} | {vals.min():.2f} |")


if __name__ == "__main__":
    main()
