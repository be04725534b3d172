"""scripts/reproduce_*.sh: every run they would launch composes and validates (toy scripts as they
are, the Slurm variant with its launcher) and every table they ask for exists — checked by running
the scripts with `python` replaced by a recorder, then expanding each command line's grid."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from opd_exp.analysis.tables import TABLES
from opd_exp.config import validate, validate_training

from .conftest import compose, sweep_jobs

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {"poweropd": 30, "lsm": 9, "rethinking": 15, "geometry": 21}  # runs each script promises
TOY_ONLY = {"multi_teacher": 9,  # no Slurm form: no real multi-teacher setup in SPEC §5
            "cross_tokenizer": 21}  # nor a real cross-tokenizer one (cross_tokenizer_qwen: unrun)


def recorded_calls(tmp_path, script: str, *args: str, env: dict | None = None) -> list[list[str]]:
    shim = tmp_path / "bin"
    shim.mkdir()
    log = tmp_path / "calls"
    (shim / "python").write_text(f'#!/usr/bin/env bash\nprintf "%q " "$@" >> {log}\necho >> {log}\n')
    (shim / "python").chmod(0o755)
    p = subprocess.run(["bash", str(ROOT / "scripts" / script), *args], cwd=tmp_path, capture_output=True,
                       text=True, env={**os.environ, **(env or {}), "PATH": f"{shim}:{os.environ['PATH']}"})
    assert p.returncode == 0, p.stderr
    return [shlex.split(line) for line in log.read_text().splitlines()]


def check(calls: list[list[str]], slurm: bool) -> tuple[int, set[str]]:
    runs, tables = 0, set()
    for call in calls:
        assert call[:2] == ["-m", "opd_exp"], call
        if call[2] == "tables":
            tables.add(call[call.index("--table") + 1])
            continue
        assert call[2] == "train"
        for job in sweep_jobs(call[3:]):  # the sweep file's grid and the command line's
            cfg = compose(job, return_hydra_config=True)
            validate(cfg, on_this_machine=not slurm)  # Slurm runs meet a GPU node's CUDA
            validate_training(cfg)
            assert cfg.trainer.resume  # a re-run script skips what it finished
            assert ("SlurmLauncher" in cfg.hydra.launcher._target_) == slurm
            runs += 1
    return runs, tables


@pytest.mark.parametrize("paper", {**SCRIPTS, **TOY_ONLY})
def test_toy_reproduction_scripts_launch_valid_runs_and_known_tables(tmp_path, paper):
    runs, tables = check(recorded_calls(tmp_path, f"reproduce_{paper}.sh", "trainer.threads=1"), slurm=False)
    assert runs == {**SCRIPTS, **TOY_ONLY}[paper] and tables and tables <= set(TABLES)


@pytest.mark.parametrize("paper", SCRIPTS)
def test_slurm_reproduction_composes_on_the_real_experiments(tmp_path, paper):
    calls = recorded_calls(tmp_path, "reproduce_slurm.sh", paper, env={"PARTITION": "gpu"})
    runs, tables = check(calls, slurm=True)
    assert runs and tables and tables <= set(TABLES)
    experiments = {a for c in calls for a in c if a.startswith("+experiment=")}
    assert all("toy" not in e for e in experiments), experiments
