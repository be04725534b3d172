"""The commands besides `train`: `python -m opd_exp eval` (Avg@k / Pass@k of pair.student, and
pair.teacher if eval.teacher) and `python -m opd_exp serve` (a vLLM server for rollout=vllm_server)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from opd_exp.config import validate
from opd_exp.data import make_encoder, student_encoder
from opd_exp.engines.hf_models import load_model, load_tokenizer, model_shape, resolve_path, stop_token_ids
from opd_exp.engines.rollout_hf import HFRollout
from opd_exp.engines.rollout_vllm import hub_source, save_untied
from opd_exp.engines.rollout_vllm_server import serve_command
from opd_exp.loop.evaluator import Evaluator


def run_eval(cfg: DictConfig, run_dir: Path) -> dict[str, float]:
    validate(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    p, d, suffix = cfg.pair, cfg.data, cfg.eval.prompt_suffix
    tokenizer = load_tokenizer(p.student, "pair.student")
    teacher_tok = load_tokenizer(p.teacher, "pair.teacher")
    evaluator = Evaluator(cfg.eval, cfg.trainer.seed, tokenizer,
                          student_encoder(cfg, tokenizer, teacher_tok, suffix),
                          teacher_encode=make_encoder(teacher_tok, d.chat_template, suffix, p.teacher)
                          if p.teacher_prompt == "own" else None)
    stop_ids = stop_token_ids(p.student, tokenizer) | stop_token_ids(p.teacher, teacher_tok)
    out: dict[str, float] = {}
    roles = [("student", "eval")] + ([("teacher", "teacher/eval")] if cfg.eval.teacher else [])
    for role, prefix in roles:
        model = load_model(cfg.pair[role], f"pair.{role}")
        rollout = HFRollout(model, tokenizer, stop_ids, cfg.rollout.batch_size)
        out.update(evaluator(rollout, 0, prefix=prefix))
    k = cfg.eval.k
    for key in sorted(out):
        if key.endswith((f"avg@{k}", f"pass@{k}")):
            print(f"{key:40s} {out[key]:.4f}")
    (run_dir / "eval.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def run_serve(cfg: DictConfig, run_dir: Path) -> int:
    """A vLLM server (blocks; its exit code). serve.role=student: on an untied copy of the student
    that the run's weight pushes replace (opd_exp/engines/rollout_vllm_server.py);
    serve.role=teacher: on pair.teacher as it is (opd_exp/engines/teacher_vllm_server.py), allowed
    enough log-probs per position for every top-K the run asks (plus padded rows)."""
    validate(cfg)
    sv = cfg.serve
    if sv.role == "teacher":
        t, p = cfg.teacher, cfg.pair.teacher
        rows, _ = model_shape(p, "pair.teacher")
        vocab = min(len(load_tokenizer(p, "pair.teacher")), len(load_tokenizer(cfg.pair.student, "pair.student")))
        padded = max(0, rows - vocab)  # as the run counts it (the student's vocabulary)
        most = max(cfg.objective.k, cfg.prompts.k, cfg.diag.k, 20) + padded
        cmd = serve_command(sv.url or t.server_urls[0], resolve_path(p.path), p.dtype,
                            cfg.trainer.seed, sv.gpu_memory_utilization or t.gpu_memory_utilization,
                            t.max_model_len, most, hub_source(p.revision, p.trust_remote_code),
                            tensor_parallel_size=sv.tensor_parallel_size)
    else:
        weights = run_dir / "server_weights"
        save_untied(load_model(cfg.pair.student, "pair.student"), weights)
        load_tokenizer(cfg.pair.student, "pair.student").save_pretrained(weights)
        r = cfg.rollout
        cmd = serve_command(sv.url or r.server_url, weights, r.dtype or cfg.pair.student.dtype,
                            cfg.trainer.seed, sv.gpu_memory_utilization or r.gpu_memory_utilization,
                            r.max_model_len, tensor_parallel_size=sv.tensor_parallel_size)
    print("serving: " + " ".join(cmd), flush=True)
    dev = {"VLLM_SERVER_DEV_MODE": "1"} if sv.role == "student" else {}  # weight pushes only
    return subprocess.run(cmd, env={**os.environ, **dev}).returncode
