"""Joining the job `torchrun` started (opd_exp/runtime/launcher.py): `init` returns this process's
`Dist` (opd_exp/core/ranks.py); `check_world` compares the job with `launcher.*`."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as tdist

from opd_exp.config import ConfigError
from opd_exp.core.ranks import Dist


def check_world(dist: Dist, launcher_cfg) -> None:
    """The job's real size must be the configured one (validation sized shards from it)."""
    want = launcher_cfg.nproc_per_node * launcher_cfg.nnodes
    if dist.world_size != want:
        raise ConfigError(f"launcher.nproc_per_node * launcher.nnodes = {want} is not allowed: "
                          f"this job has {dist.world_size} processes (started by another launcher?); "
                          "set them to match")


def launched() -> bool:
    """True inside a process that torchrun (or the deepspeed launcher) started."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(backend: str = "auto", timeout_minutes: int = 60) -> Dist:
    """Join the job torchrun set up (env:// rendezvous); one plain process otherwise."""
    if not launched() or int(os.environ["WORLD_SIZE"]) == 1:
        return Dist()
    if not tdist.is_initialized():
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        local_rank = int(os.environ["LOCAL_RANK"])
        if backend == "nccl":  # CUDA tensors over NCCL; the loop's CPU scalars over gloo
            torch.cuda.set_device(local_rank)
            backend = "cpu:gloo,cuda:nccl"
        tdist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
    return Dist(rank=tdist.get_rank(), world_size=tdist.get_world_size(),
                local_rank=int(os.environ["LOCAL_RANK"]))
