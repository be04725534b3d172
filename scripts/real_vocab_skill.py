"""Do the real-vocabulary toy models have the toy pair's skills? (docs/results.md, issue 24)

For each model, on the held-out benchmarks (`--problems` per level, levels 1–6), under its own
tokenizer and chat template:
- greedy accuracy (the argmax answer, `\\boxed{}` checked by the evaluator's `is_correct`): a cheap
  stand-in for Avg@8, whose sampling at 151,936 columns costs ≈ 1 s per decode step of 64
  sequences on this CPU (docs/benchmarks.md);
- the negative log-likelihood of the reference answer, in nats per answer (summed over its tokens,
  so tokenizations compare: it is −log p of the same text).

    python scripts/real_vocab_skill.py --problems 32 \\
        toy:teacher toy:qwen3_teacher toy:qwen25_teacher toy:qwen36_teacher \\
        toy:student toy:qwen3_student toy:qwen25_student
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd_exp import toyworld
from opd_exp.engines.hf_models import resolve_path
from opd_exp.evaluation import is_correct
from opd_exp.toyworld import task
from opd_exp.toyworld.build import benchmark_problems
from opd_exp.toyworld.qwen_models import render


def answer_nll(model, tok, prompts, responses) -> list[float]:
    """−log p(response | prompt) in nats, one per document (teacher forcing, no padding)."""
    out = []
    with torch.no_grad():
        for prompt, response in zip(prompts, responses):
            p = tok(prompt, add_special_tokens=False).input_ids
            r = tok(response, add_special_tokens=False).input_ids
            logits = model(torch.tensor([p + r])).logits[0, len(p) - 1:-1]
            logp = logits[:, :len(tok)].float().log_softmax(-1)  # padded rows are never tokens
            out.append(-float(logp.gather(-1, torch.tensor(r)[:, None]).sum()))
    return out


def greedy_correct(model, tok, prompts, answers: list[str], batch: int = 64) -> list[bool]:
    tok.padding_side = "left"
    ok = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            enc = tok(list(prompts[i:i + batch]), return_tensors="pt", padding=True, add_special_tokens=False)
            seq = model.generate(**enc, do_sample=False, max_new_tokens=96, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
            texts = tok.batch_decode(seq[:, enc.input_ids.shape[1]:], skip_special_tokens=False)
            ok += [is_correct(t, a) for t, a in zip(texts, answers[i:i + batch])]
    return ok


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--problems", type=int, default=32, help="per level")
    a = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    # the shipped benchmarks' problems, with their reference thoughts (the .jsonl keeps answers only)
    benches = benchmark_problems(toyworld.manifest()["seed"])
    for path in a.models:
        folder = resolve_path(path)
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        row = {"model": path, "tokens": len(tok), "rows": model.config.vocab_size}
        accs, nlls = [], []
        for level in task.LEVELS:
            probs = benches[f"toy_L{level}"][:a.problems]
            # prompt and reference answer in the model's own rendering (Qwen3.6 opens <think>)
            prompts, responses = zip(*(render(tok, p) for p in probs))
            accs.append(sum(greedy_correct(model, tok, prompts, [p.answer for p in probs])) / len(probs))
            nlls += answer_nll(model, tok, prompts, responses)
            row[f"L{level}"] = round(accs[-1], 3)
        row["greedy_acc"] = round(sum(accs) / len(accs), 3)
        row["answer_nll_nats"] = round(sum(nlls) / len(nlls), 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| model | tokens | rows | " + " | ".join(f"L{lv}" for lv in task.LEVELS)
          + " | greedy acc | answer NLL (nats) |")
    print("|---|---|---|" + "---|" * len(task.LEVELS) + "---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['tokens']:,} | {r['rows']:,} | "
              + " | ".join(f"{r[f'L{lv}']:.3f}" for lv in task.LEVELS)
              + f" | {r['greedy_acc']:.3f} | {r['answer_nll_nats']:.3f} |")


if __name__ == "__main__":
    main()
