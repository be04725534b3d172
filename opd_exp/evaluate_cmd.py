"""`python -m opd_exp eval`: Avg@k / Pass@k of pair.student (and pair.teacher if eval.teacher)."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from opd_exp.config import validate
from opd_exp.data import make_encoder
from opd_exp.models import load_model, load_tokenizer, stop_token_ids
from opd_exp.rollout import HFRollout
from opd_exp.train import Evaluator


def run_eval(cfg: DictConfig, run_dir: Path) -> dict[str, float]:
    validate(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tokenizer = load_tokenizer(cfg.pair.student, "pair.student")
    evaluator = Evaluator(cfg, tokenizer, make_encoder(tokenizer, cfg.data.chat_template,
                                                       cfg.eval.prompt_suffix))
    out: dict[str, float] = {}
    roles = [("student", "eval")] + ([("teacher", "teacher/eval")] if cfg.eval.teacher else [])
    for role, prefix in roles:
        model = load_model(cfg.pair[role], f"pair.{role}")
        rollout = HFRollout(model, tokenizer, stop_token_ids(model, tokenizer),
                            cfg.rollout.batch_size)
        out.update(evaluator(rollout, 0, prefix=prefix))
    k = cfg.eval.k
    for key in sorted(out):
        if key.endswith((f"avg@{k}", f"pass@{k}")):
            print(f"{key:40s} {out[key]:.4f}")
    (run_dir / "eval.json").write_text(json.dumps(out, indent=2) + "\n")
    return out
