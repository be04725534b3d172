"""One command starts every rank: `python -m opd_exp train launcher.nproc_per_node=2 …`.

When `launcher.nproc_per_node * launcher.nnodes > 1` and this process was not itself started by
a launcher, the command re-runs itself under `torchrun` (torch.distributed.run) with the same
overrides and the run directory pinned, and waits. Multi-node: run the same command on every
node with `launcher.nnodes=N launcher.node_rank=i launcher.master_addr=<node 0's address>` and
a run directory on a shared filesystem (`hydra.run.dir=…`); torchrun's static rendezvous joins
them into one job (docs/distributed.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from opd_exp.runtime.distributed import launched


def wants_launch(launcher_cfg) -> bool:
    return launcher_cfg.nproc_per_node * launcher_cfg.nnodes > 1 and not launched()


def torchrun_command(launcher_cfg, command: str, overrides: list[str], run_dir: Path) -> list[str]:
    c = launcher_cfg
    return [sys.executable, "-m", "torch.distributed.run",
            f"--nproc_per_node={c.nproc_per_node}", f"--nnodes={c.nnodes}",
            f"--node_rank={c.node_rank}", f"--master_addr={c.master_addr}",
            f"--master_port={c.master_port}",
            "-m", "opd_exp", command, *overrides, f"hydra.run.dir={run_dir}",
            "hydra.mode=RUN"]  # a sweep's job: each rank runs this one job, never the sweep again


def launch(launcher_cfg, command: str, overrides: list[str], run_dir: Path,
           extra_env: dict[str, str] | None = None) -> int:
    """Run `python -m opd_exp <command> <overrides>` on this node's ranks; the exit code.
    `extra_env`: variables the ranks get beyond this process's own."""
    cmd = torchrun_command(launcher_cfg, command, overrides, run_dir)
    env = {**os.environ, **(extra_env or {})}
    # each rank gets its share of the cores (torchrun would otherwise force 1 thread)
    cores = os.cpu_count() or 1
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // launcher_cfg.nproc_per_node)))
    print("launching: " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, env=env).returncode
