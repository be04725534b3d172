"""Metric loggers: a local `metrics.jsonl` (always) and W&B (by `logger.mode`).

Every record is one JSON object per line with `step` (optimizer steps done). Metric prefixes:
train/ (learner), rollout/ (sampler), teacher/ (teacher scoring and the teacher's own eval),
reward/ (per-token reward statistics), eval/ (student evaluation); docs/metrics.md defines each.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from opd_exp.core.protocols import Logger


def read_records(path: Path) -> list[dict]:
    """The whole records of a metrics.jsonl (a line torn by a kill is skipped); [] if none."""
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def read_cache(path: Path, made_under: dict) -> list[dict]:
    """The records of a cache file (teacher traces, prompt scores) made under the settings
    `made_under` (its first line); a file made under other settings (a run dir reused with
    another teacher, sampling or score) is started over, never silently read back."""
    made_under = json.loads(json.dumps(made_under))  # as it reads back (tuples → lists)
    records = read_records(path)
    if records and records[0] == {"made_under": made_under}:
        if len(records) < len(path.read_text().splitlines()):  # a line torn by a kill: drop it
            path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return records[1:]
    if records:
        print(f"{path.name}: made under other settings; starting it over", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"made_under": made_under}) + "\n")
    return []


def _step(line: str) -> int | None:
    """The record's step, or None for a line that is not a whole record (torn by a kill)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None


class JsonlLogger:
    """`resume_step`: the checkpoint a resumed run starts from — records up to it are kept, later
    ones (and a torn last line) dropped, as they will be logged again; None: a run starting at
    step 0, which replaces any file there (a resume that found no checkpoint starts over)."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        keep = []
        if resume_step is not None and path.exists():
            keep = [line for line in path.read_text().splitlines()
                    if (s := _step(line)) is not None and s <= resume_step]
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
    """W&B never stops training: if `wandb.init` or a `log` fails (online with a bad key, no
    network, a full disk…), one warning is printed and W&B is left out for the rest of the run;
    metrics.jsonl keeps every record.

    A resumed run continues the same W&B run (`resume="allow"`, id in `<run>/wandb_run_id`).
    Records logged after the last checkpoint and before a kill are logged again on resume: W&B
    then shows those steps twice (its x-axis is our `step`); metrics.jsonl holds them once."""

    def __init__(self, cfg, run_dir: Path, config: dict, resume: bool):
        self.run, self.failed = None, False
        try:
            self._init(cfg, run_dir, config, resume)
        except Exception as e:  # noqa: BLE001 — any W&B failure: warn, go on without it
            self._fail("init", e)

    def _init(self, cfg, run_dir: Path, config: dict, resume: bool) -> None:
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
                              group=cfg.group, tags=list(cfg.tags), config=config, dir=str(run_dir), mode=mode,
                              id=run_id, resume="allow" if run_id else None)
        run_id_file.write_text(self.run.id)
        self.run.define_metric("*", step_metric="step")

    def _fail(self, what: str, e: Exception) -> None:
        if not self.failed:
            first = (str(e).strip().splitlines() or [""])[0][:200]
            print(f"warning: W&B {what} failed ({type(e).__name__}: {first}); training goes on "
                  "without W&B, metrics.jsonl has every record", file=sys.stderr, flush=True)
        self.failed, self.run = True, None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.run is not None:
            try:
                self.run.log({"step": step, **metrics})
            except Exception as e:  # noqa: BLE001
                self._fail("log", e)

    def finish(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as e:  # noqa: BLE001
                self._fail("finish", e)


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
