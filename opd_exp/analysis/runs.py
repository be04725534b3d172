"""The runs of a sweep dir as `python -m opd_exp tables` reads them, what a table is, and the
numbers it takes from a run's records."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from omegaconf import OmegaConf

from opd_exp.runtime.loggers import read_records
from opd_exp.runtime.plots import series


@dataclass
class Run:
    path: Path
    cfg: dict
    records: list[dict]
    finished: bool


@dataclass(frozen=True)
class Table:
    title: str
    row: Callable[[dict], str]  # the row a run belongs to, from its resolved config
    # extra columns: name → value from a finished run and the eval's k
    extra: dict[str, Callable[[Run, int], float]] = field(default_factory=dict)
    paper: str = ""  # the paper's setting and numbers, as SPEC §5 gives them
    paper_row: Callable[[dict], str] | None = None  # the paper's number for a row, its own column
    # runs whose mean gradient norm the column "baseline ÷ this grad norm" divides (PowerOPD's ratio)
    baseline: Callable[[dict], bool] | None = None
    keep: Callable[[dict], bool] = lambda cfg: True  # the runs of SWEEP_DIR this table is about


def find_runs(sweep_dir: Path) -> list[Run]:
    runs = []
    for cfg_path in sorted(sweep_dir.rglob("config.yaml")):
        d = cfg_path.parent
        if d.name == ".hydra" or "checkpoints" in d.parts:
            continue
        metrics = d / "metrics.jsonl"
        runs.append(Run(d, OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=True),
                        read_records(metrics),
                        (d / "final_metrics.json").exists()))
    return runs


def last(records: list[dict], key: str) -> float:
    values = series(records, key)[1]
    return values[-1] if values else float("nan")


def first(records: list[dict], key: str) -> float:
    values = series(records, key)[1]
    return values[0] if values else float("nan")


def mean_of(records: list[dict], key: str) -> float:
    values = series(records, key)[1]
    return statistics.fmean(values) if values else float("nan")


def early_locking(run: Run, k: int) -> float:
    """Sim_K(first stored step, end) of the update subspaces, parameter-count weighted
    (`diag/locking.json`, written at the end of a run with diag.param_every)."""
    path = run.path / "diag" / "locking.json"
    if not path.exists():
        return float("nan")
    by_step = json.loads(path.read_text())
    return by_step[min(by_step, key=int)] if by_step else float("nan")


# columns shared by several tables: name → value of a finished run
