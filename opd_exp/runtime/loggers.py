"""Metric loggers: a local `metrics.jsonl` (always) and W&B (by `logger.mode`).

Every record is one JSON object per line with `step` (optimizer steps done). Metric prefixes:
train/ (learner), rollout/ (sampler), teacher/ (teacher scoring and the teacher's own eval),
reward/ (per-token reward statistics), eval/ (student evaluation); docs/metrics.md defines each.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from opd_exp.core.protocols import Logger


class JsonlLogger:
    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        if resume_step is not None and path.exists():  # drop records past the checkpoint
            keep = [line for line in path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in keep))
        self.file = open(path, "a")

    def log(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in metrics.items()}
        self.file.write(json.dumps({"step": step, **clean}) + "\n")
        self.file.flush()

    def finish(self) -> None:
        self.file.close()


class WandbLogger:
    def __init__(self, cfg, run_dir: Path, config: dict, resume: bool):
        import wandb

        mode = cfg.mode
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        os.environ.setdefault("WANDB_DIR", str(run_dir))
        os.environ.setdefault("WANDB_SILENT", "true")  # our own step lines stay readable
        (run_dir / "wandb").mkdir(exist_ok=True)
        run_id_file = run_dir / "wandb_run_id"
        run_id = run_id_file.read_text().strip() if resume and run_id_file.exists() else None
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name,
                              tags=list(cfg.tags), config=config, dir=str(run_dir), mode=mode,
                              id=run_id, resume="allow" if run_id else None)
        run_id_file.write_text(self.run.id)
        self.run.define_metric("*", step_metric="step")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({"step": step, **metrics})

    def finish(self) -> None:
        self.run.finish()


class MultiLogger:
    def __init__(self, loggers: list[Logger]):
        self.loggers = loggers

    def log(self, metrics: dict[str, float], step: int) -> None:
        for lg in self.loggers:
            lg.log(metrics, step)

    def finish(self) -> None:
        for lg in self.loggers:
            lg.finish()


def make_logger(logger_cfg, run_dir: Path, config: dict, resume_step: int | None,
                main: bool = True) -> Logger:
    """`logger.*`; `config`: the run's whole config, for W&B. Rank 0 (`main`) logs; the other
    ranks get a logger that writes nothing."""
    if not main:
        return MultiLogger([])
    loggers: list[Logger] = [JsonlLogger(run_dir / "metrics.jsonl", resume_step)]
    if logger_cfg.mode != "disabled":
        loggers.append(WandbLogger(logger_cfg, run_dir, config, resume_step is not None))
    return MultiLogger(loggers)
