"""`python -m opd_exp plan +experiment=…`: the per-GPU memory plan of a run, before any weight is
loaded (opd_exp/runtime/memory_plan.py) — a table by component, the peak and whether it fits.
Exit code 0 when it fits, 1 when it does not."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from opd_exp.config import validate, validate_training
from opd_exp.runtime.memory_plan import make_plan, visible_gpu_gib


def run_plan(cfg: DictConfig, run_dir: Path) -> int:
    validate(cfg, on_this_machine=False)  # planned for a GPU node, from any machine
    validate_training(cfg)
    gpu = cfg.plan.gpu_memory_gib or visible_gpu_gib()
    plan = make_plan(cfg, gpu_gib=gpu)
    W = cfg.launcher.nproc_per_node * cfg.launcher.nnodes
    print(f"memory plan: {cfg.experiment or 'this run'}, {W} rank(s), one GPU of {plan.gpu_gib:.1f} GiB"
          + ("" if gpu else " (no GPU visible: an 80 GB H100 assumed; plan.gpu_memory_gib sets it)"))
    print(plan.table())
    verdict = plan.refusal()
    print(verdict or f"fits: {plan.headroom:.0%} of the GPU free at the peak")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "plan.md").write_text(plan.table() + "\n")
    return 0 if verdict is None else 1
