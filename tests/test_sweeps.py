"""Sweeps kept in files (conf/sweep/): each composes with the toy and the real experiments, runs
as a Hydra multirun, and a re-launched sweep skips the runs it has finished."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from opd_exp.__main__ import CONF_DIR
from opd_exp.config import validate

from .conftest import TINY_RUN, compose, sweep_jobs

SWEEPS = sorted(p.stem for p in (Path(CONF_DIR) / "sweep").glob("*.yaml"))
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("sweep", SWEEPS)
@pytest.mark.parametrize("experiment", ["powerOPD_toy", "powerOPD_qwen3"])
def test_every_sweep_file_composes_with_toy_and_real_experiments(sweep, experiment):
    cfg = compose([f"+sweep={sweep}", f"+experiment={experiment}"])
    validate(cfg)
    assert cfg.trainer.resume  # re-launching a sweep continues it


@pytest.mark.parametrize("experiment", ["vanillaOPD_toy", "lsm_toy", "powerOPD_qwen3"])
def test_method_arms_keep_their_objective_and_reward_in_a_sweep(experiment):
    """Each job composed as Hydra's sweeper composes it: +method after +experiment, so the arm's
    objective and reward win over the experiment's (an arm in the sweep file's grid would lose)."""
    got = {}
    for job in sweep_jobs(["+sweep=geometry_trio", f"+experiment={experiment}", "+method=opd,sft,rlvr"]):
        cfg = compose(job)
        method = next(a.split("=")[1] for a in job if a.startswith("+method="))
        got.setdefault(method, set()).add((cfg.objective.name, cfg.reward.name, cfg.rollout.n))
    base = compose([f"+experiment={experiment}"])
    assert got["opd"] == {(base.objective.name, base.reward.name, base.rollout.n)}
    assert got["sft"] == {("sft", base.reward.name, base.rollout.n)}
    assert got["rlvr"] == {(base.objective.name, "verifiable", 8)}


@pytest.mark.parametrize("sweep", SWEEPS)
def test_run_dirs_are_named_by_the_swept_values_only(sweep):
    """A sweep's run dir names its arm and seed, never the experiment or the sweep file (Hydra
    matches exclude_keys without the + of `+experiment`) nor machine settings such as threads."""
    cfg = compose([f"+sweep={sweep}", "+experiment=vanillaOPD_toy", "+method=sft", "trainer.seed=1",
                   "trainer.threads=1", "logger.mode=disabled"], return_hydra_config=True)
    assert cfg.hydra.job.override_dirname == "+method=sft,trainer.seed=1"


@pytest.mark.parametrize("sweep", SWEEPS)
def test_sweep_files_start_with_package_then_command(sweep):
    lines = (Path(CONF_DIR) / "sweep" / f"{sweep}.yaml").read_text().splitlines()
    assert lines[0] == "# @package _global_" and lines[1].startswith("# python -m opd_exp train +sweep=")


def test_relaunched_sweep_skips_finished_runs(tmp_path, use_tiny_world):
    cmd = [sys.executable, "-m", "opd_exp", "train", "+sweep=poweropd_alpha", "+experiment=powerOPD_toy",
           *TINY_RUN, "reward.alpha=0.5,2", "trainer.seed=0", "trainer.steps=2", "eval.every=0",
           f"hydra.sweep.dir={tmp_path}"]
    env = {**os.environ, "OPD_EXP_TOY_DIR": str(use_tiny_world)}
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    runs = sorted(p.parent for p in tmp_path.glob("*/final_metrics.json"))
    assert [r.name for r in runs] == ["alpha0.5_seed0", "alpha2.0_seed0"]
    before = {r: (r / "metrics.jsonl").read_text() for r in runs}
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("resumed from") == 2
    for r in runs:  # nothing trained twice, nothing logged twice
        assert (r / "metrics.jsonl").read_text() == before[r]
        assert json.loads((r / "final_metrics.json").read_text())


def test_a_sweeps_runs_share_one_wandb_group(tmp_path, use_tiny_world, monkeypatch):
    import wandb

    from opd_exp.train import train

    seen = {}

    class Run:
        id = "x"

        def define_metric(self, *a, **k):
            pass

        def log(self, *a, **k):
            pass

        def finish(self):
            pass

    def init(**kw):
        seen.update(kw)
        return Run()

    monkeypatch.setattr(wandb, "init", init)
    cfg = compose(["+sweep=seeds", "+experiment=vanillaOPD_toy", *TINY_RUN, "logger.mode=offline",
                   "trainer.steps=1", "eval.every=0"])
    train(cfg, tmp_path)
    assert seen["group"] == "vanillaOPD_toy-seeds"


def test_a_sweep_job_relaunched_under_torchrun_runs_that_job_not_the_sweep(tmp_path):
    """With launcher.nproc_per_node > 1 a job re-runs itself under torchrun with its task
    overrides, +sweep=… among them: the ranks must compose one run, not launch the sweep again."""
    from omegaconf import OmegaConf

    from opd_exp.runtime.launcher import torchrun_command

    task = ["+sweep=poweropd_alpha", "+experiment=powerOPD_qwen3", "reward.alpha=0.5", "trainer.seed=0"]
    launcher = OmegaConf.create({"nproc_per_node": 8, "nnodes": 1, "node_rank": 0,
                                 "master_addr": "127.0.0.1", "master_port": 29500})
    cmd = torchrun_command(launcher, "train", task, tmp_path)
    child = cmd[cmd.index("train") + 1:]
    cfg = compose(child, return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.RUN" and cfg.hydra.run.dir == str(tmp_path)
    assert cfg.reward.alpha == 0.5


@pytest.mark.parametrize("experiment", ["powerOPD_toy", "powerOPD_qwen3"])
def test_slurm_launcher_config_composes_with_the_submitit_plugin(experiment):
    cfg = compose(["+sweep=poweropd_alpha", f"+experiment={experiment}", "hydra/launcher=slurm",
                   "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 8, 1)
    assert launcher.max_num_timeout > 0  # a timed-out job is requeued and resumes its run


def test_cli_accepts_the_plugins_launchers_and_names_them_on_a_typo():
    from opd_exp.__main__ import unknown_option

    assert unknown_option(["hydra/launcher=submitit_slurm", "hydra/launcher=slurm"]) is None
    assert unknown_option(["hydra/launcher=slrum"]) == (
        "hydra/launcher=slrum is not allowed: one of basic, slurm, submitit_local, submitit_slurm")


@pytest.mark.slow
def test_sweep_through_the_submitit_launcher_runs_each_job_in_its_own_process(tmp_path, use_tiny_world):
    """hydra/launcher=submitit_local takes the Slurm launcher's path (the job pickled, run by
    submitit in another process) without a cluster; a re-launch skips the finished runs."""
    cmd = [sys.executable, "-m", "opd_exp", "train", "+sweep=poweropd_alpha", "+experiment=powerOPD_toy",
           "hydra/launcher=submitit_local", *TINY_RUN, "reward.alpha=0.5,2", "trainer.seed=0",
           "trainer.steps=1", "eval.every=0", "trainer.threads=1", f"hydra.sweep.dir={tmp_path}"]
    env = {**os.environ, "OPD_EXP_TOY_DIR": str(use_tiny_world)}
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    runs = sorted(p.parent.name for p in tmp_path.glob("*/final_metrics.json"))
    assert runs == ["alpha0.5_seed0", "alpha2.0_seed0"]
    assert list(tmp_path.glob(".submitit/*/*_result.pkl"))  # submitit ran the jobs
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    logs = "".join(p.read_text() for p in tmp_path.glob(".submitit/*/*_log.out"))
    assert logs.count("resumed from") == 2


def test_wandb_sweep_file_gives_each_grid_point_a_valid_run_in_its_own_dir():
    """The agent's command for every point of sweeps/wandb_poweropd_alpha.yaml, built with W&B's
    own argument formatter and its whole-item macro rule, composes and validates."""
    import itertools

    import yaml
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    spec = yaml.safe_load((ROOT / "sweeps" / "wandb_poweropd_alpha.yaml").read_text())
    grid = {name: p["values"] for name, p in spec["parameters"].items()}
    dirs = set()
    for point in itertools.product(*grid.values()):
        args = create_sweep_command_args({"args": {n: {"value": v} for n, v in zip(grid, point)}})
        argv = []
        for item in spec["command"]:  # the agent replaces items that are a whole ${macro} only
            argv += args.get(item[2:-1], []) if item.startswith("${") and item.endswith("}") else [item]
        assert argv[:4] == ["python", "-m", "opd_exp", "train"]
        cfg = compose(argv[4:], return_hydra_config=True)
        validate(cfg)
        assert (cfg.reward.alpha, cfg.trainer.seed) == (float(point[0]), point[1])
        dirs.add(cfg.hydra.run.dir)
    assert len(dirs) == 18 and "multirun/powerOPD_toy/wandb_alpha/alpha0.5_seed1" in dirs
