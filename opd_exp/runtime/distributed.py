"""Joining the job `torchrun` started (opd_exp/runtime/launcher.py): `init` returns this process's
`Dist` (opd_exp/core/ranks.py); `check_world` compares the job with `launcher.*`."""

from __future__ import annotations

import gc
import os
import sys
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
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if dist.is_main and gpus > launcher_cfg.nproc_per_node:
        print(f"warning: this node has {gpus} GPUs and the job {launcher_cfg.nproc_per_node} "
              f"rank(s) on it: {gpus - launcher_cfg.nproc_per_node} stay idle "
              f"(launcher.nproc_per_node={gpus} uses them all)", flush=True)


def launched() -> bool:
    """True inside a process that torchrun (or the deepspeed launcher) started."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(backend: str = "auto", timeout_minutes: int = 60, group_of_one: bool = False) -> Dist:
    """Join the job torchrun set up (env:// rendezvous); one plain process otherwise.

    `group_of_one`: a process no launcher started still gets a one-rank process group (over an
    in-memory store: no port, no rank variables). DeepSpeed needs one: without it
    `deepspeed.initialize` → `init_distributed` looks for RANK/WORLD_SIZE/MASTER_ADDR/… and,
    missing them, tries MPI discovery (`import mpi4py`) and fails; its engine then reads
    LOCAL_RANK, set here (with RANK and WORLD_SIZE) where no launcher did."""
    if not launched() or int(os.environ["WORLD_SIZE"]) == 1:
        if group_of_one and not tdist.is_initialized():
            for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
                if k not in os.environ:  # DeepSpeed's engine reads LOCAL_RANK itself
                    os.environ[k] = v
                    _ADDED_ENV.append(k)
            tdist.init_process_group(backend=_backend(backend, 0), store=tdist.HashStore(), rank=0,
                                     world_size=1, timeout=timedelta(minutes=timeout_minutes))
            _OWN_GROUP.append(True)
        return Dist(local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    if not tdist.is_initialized():
        local_rank = int(os.environ["LOCAL_RANK"])
        tdist.init_process_group(backend=_backend(backend, local_rank),
                                 timeout=timedelta(minutes=timeout_minutes))
    return Dist(rank=tdist.get_rank(), world_size=tdist.get_world_size(),
                local_rank=int(os.environ["LOCAL_RANK"]))


_ADDED_ENV: list[str] = []  # rank variables `init` set for a group of one
_OWN_GROUP: list[bool] = []  # `init` made the one-rank group


def shutdown_vllm_engines() -> None:
    """This process's in-process vLLM engines, newest first (rollout_vllm.shutdown_engines; that
    module is imported wherever one started)."""
    engines = sys.modules.get("opd_exp.engines.rollout_vllm")
    if engines is not None:
        engines.shutdown_engines()


def restore_env() -> None:
    """After a run (finished or failed): the one-rank group `init` made is gone (a failed run
    never reached `Dist.close`) and so are the rank variables it set, so a later job in this
    process (a sweep's next run) starts as a plain process again. A failed run's vLLM engines are
    shut down first (rollout_vllm.shutdown_engines), while the group they joined still exists."""
    shutdown_vllm_engines()
    if _OWN_GROUP and tdist.is_initialized():
        tdist.destroy_process_group()
        gc.collect()
    _OWN_GROUP.clear()
    while _ADDED_ENV:
        os.environ.pop(_ADDED_ENV.pop(), None)


def _backend(backend: str, local_rank: int) -> str:
    """`auto`: NCCL for CUDA tensors (this rank's GPU made current) with gloo for the loop's CPU
    scalars; gloo on a CPU-only machine."""
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        backend = "cpu:gloo,cuda:nccl"
    return backend
