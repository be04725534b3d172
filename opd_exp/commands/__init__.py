"""The commands besides `train`: `python -m opd_exp eval` (Avg@k / Pass@k of pair.student, and
pair.teacher if eval.teacher) and `python -m opd_exp serve` (a vLLM server for rollout=vllm_server)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

from opd_exp.config import validate
from opd_exp.data import make_encoder, student_encoder
from opd_exp.engines.hf_models import load_model, load_tokenizer, model_shape, resolve_path, stop_token_ids
from opd_exp.engines.rollout_hf import HFRollout
from opd_exp.engines.rollout_vllm import hub_source, save_untied
from opd_exp.config.errors import ConfigError
from opd_exp.engines.rollout_vllm_server import SERVED_MARK, serve_command, server_token
from opd_exp.engines.server_guard import TOKEN_FILE_ENV, WEIGHTS_DIR_ENV, is_loopback, token_file
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


def guard_env(cfg: DictConfig, url: str, weights_dir: Path | None) -> dict[str, str]:
    """The environment of the server's guard (opd_exp/engines/server_guard.py): the secret's file
    (and the secret for vLLM's own --api-key, VLLM_API_KEY: never on the command line), the folder
    reloads may come from. Refused in one line: a bind beyond loopback without a secret."""
    token = server_token(cfg)
    host = urlparse(url).hostname
    if token is None and host and not is_loopback(host):
        raise ConfigError(f"serve.url: {url} binds beyond this machine ({host}); that needs a shared "
                          f"secret: serve.token_file or {TOKEN_FILE_ENV} naming a file of mode 600 "
                          "(or bind http://127.0.0.1:PORT and reach it through an SSH tunnel)")
    env = {WEIGHTS_DIR_ENV: str(weights_dir)} if weights_dir else {}
    if token is not None:
        env.update({TOKEN_FILE_ENV: str(Path(token_file(cfg.serve.token_file)).expanduser().resolve()),
                    "VLLM_API_KEY": token})
    return env


def run_serve(cfg: DictConfig, run_dir: Path) -> int:
    """A vLLM server (blocks; its exit code), behind opd_exp's guard. serve.role=student: on an
    untied copy of the student that the run's weight pushes replace, reloaded from that folder only
    (opd_exp/engines/rollout_vllm_server.py); serve.role=teacher: on pair.teacher as it is
    (opd_exp/engines/teacher_vllm_server.py), allowed enough log-probs per position for every top-K
    the run asks (plus padded rows)."""
    validate(cfg)
    sv = cfg.serve
    url = sv.url or (cfg.teacher.server_urls[0] if sv.role == "teacher" else cfg.rollout.server_url)
    weights = None if sv.role == "teacher" else (run_dir / "server_weights").absolute()
    env = guard_env(cfg, url, weights)  # refused before any weight is loaded
    if sv.role == "teacher":
        t, p = cfg.teacher, cfg.pair.teacher
        rows, _ = model_shape(p, "pair.teacher")
        vocab = min(len(load_tokenizer(p, "pair.teacher")), len(load_tokenizer(cfg.pair.student, "pair.student")))
        padded = max(0, rows - vocab)  # as the run counts it (the student's vocabulary)
        most = max(cfg.objective.k, cfg.prompts.k, cfg.diag.k, 20) + padded
        cmd = serve_command(url, resolve_path(p.path), p.dtype,
                            cfg.trainer.seed, sv.gpu_memory_utilization or t.gpu_memory_utilization,
                            t.max_model_len, most, hub_source(p.revision, p.trust_remote_code),
                            tensor_parallel_size=sv.tensor_parallel_size)
    else:
        save_untied(load_model(cfg.pair.student, "pair.student"), weights)
        load_tokenizer(cfg.pair.student, "pair.student").save_pretrained(weights)
        (weights / SERVED_MARK).write_text(json.dumps({"served_by": "python -m opd_exp serve",
                                                       "pushes": "push-<id>/ folders of the run"}) + "\n")
        r = cfg.rollout
        cmd = serve_command(url, weights, r.dtype or cfg.pair.student.dtype,
                            cfg.trainer.seed, sv.gpu_memory_utilization or r.gpu_memory_utilization,
                            r.max_model_len, tensor_parallel_size=sv.tensor_parallel_size)
    print("serving: " + " ".join(cmd), flush=True)
    secret = (f"every path but /health wants the secret in {env[TOKEN_FILE_ENV]}" if TOKEN_FILE_ENV in env
              else "no secret (loopback only)")
    print(f"guard: {secret}; weight reloads " + (f"only from {weights}" if weights else "refused"), flush=True)
    dev = {"VLLM_SERVER_DEV_MODE": "1"} if sv.role == "student" else {}  # weight pushes only
    inherited = {k: v for k, v in os.environ.items() if k != WEIGHTS_DIR_ENV}
    return subprocess.run(cmd, env={**inherited, **env, **dev}).returncode
