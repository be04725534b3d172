"""`python -m opd_exp diagnose RUN_DIR`: the parameter-space diagnostics (SPEC §4) of a run,
offline, over its saved checkpoints: W_0 = the run's pair.student, W_t = each checkpoint's
student. Writes RUN_DIR/diag/offline/metrics.json (one row per checkpoint: the diag/param/*
keys) and RUN_DIR/diag/offline/locking.json (Sim_K(t, end) over the checkpoints), and prints
a table. Keep the checkpoints you want with trainer.keep_last / trainer.save_every.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from opd_exp.engines.hf_models import load_model
from opd_exp.loop.geometry import Geometry, block_matrices, cpu_copy, write_locking
from opd_exp.runtime import checkpoint

SHOWN = ("sparsity", "principal_cos_mean", "spectral_shift", "stable_rank", "update_rel_norm")


def run_diagnose(run_dir: Path) -> dict[int, dict[str, float]]:
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise SystemExit(f"error: {run_dir} holds no run (no config.yaml)")
    cfg = OmegaConf.load(cfg_path)
    steps = sorted(checkpoint.checkpoint_root(run_dir).glob("step_*"))
    if not steps:
        raise SystemExit(f"error: {run_dir} has no checkpoints under checkpoints/")
    out_dir = run_dir / "diag" / "offline"
    for old in (out_dir / "subspaces").glob("step_*.pt"):
        old.unlink()
    start = load_model(cfg.pair.student, "pair.student")
    geometry = Geometry(cpu_copy(block_matrices(start)), cfg.diag, out_dir, write=True)
    rows = {}
    for ckpt in steps:
        step = checkpoint.load_step(ckpt)
        model = load_model(OmegaConf.merge(cfg.pair.student, {"path": str(ckpt / "student")}),
                           f"checkpoint {ckpt.name}")
        rows[step] = geometry.metrics(model, step)
    (out_dir / "metrics.json").write_text(json.dumps({str(s): m for s, m in rows.items()}, indent=1) + "\n")
    sims = write_locking(out_dir / "subspaces", out_dir / "locking.json")
    print(f"{'step':>6s} " + " ".join(f"{k:>18s}" for k in SHOWN) + f" {'Sim_K(t, end)':>14s}")
    for s, m in rows.items():
        print(f"{s:6d} " + " ".join(f"{m.get(f'diag/param/all/{k}', float('nan')):18.4f}" for k in SHOWN)
              + f" {sims.get(s, float('nan')):14.4f}")
    print(f"written: {out_dir}/metrics.json, locking.json")
    return rows
