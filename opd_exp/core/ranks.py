"""The ranks of one job as every layer sees them: `Dist` (this rank, the world size, shards, sums).

Data parallel: every rank holds the student (whole, or a ZeRO shard of it), a rollout engine and
a teacher, and works on its shard of each step's prompts and eval problems. Rank 0 alone logs,
prints and publishes checkpoints. With one process (`Dist()`) every call is a no-op, so code reads
the same with and without a launcher. Joining a job: opd_exp/runtime/distributed.py.
"""

from __future__ import annotations

import gc

from dataclasses import dataclass

import torch
import torch.distributed as tdist

# how per-rank metrics combine into the logged value (docs/metrics.md); everything else: mean
SUM_KEYS = ("rollout/tokens", "train/masked_tokens", "schedule/traces", "schedule/rejected",
            "schedule/dropped", "schedule/kept_rejected", "data/teacher_cache_hits",
            "data/teacher_cache_misses", "xtok/unaligned_rows", "xtok/cut_rows")
MIN_SUFFIXES = ("/min", "_min")
MAX_SUFFIXES = ("/max", "_max")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """This rank's accelerator (cuda:<local rank>) if there is one, else the CPU."""
        return torch.device(f"cuda:{self.local_rank}") if torch.cuda.is_available() else torch.device("cpu")

    def shard(self, items: list) -> list:
        """This rank's share: items rank, rank + W, rank + 2W, …"""
        return items[self.rank::self.world_size]

    def close(self) -> None:
        """Every rank past its last collective, then the process groups destroyed and the
        engines' references to them collected while the interpreter is alive (gloo's worker
        threads torn down at interpreter exit abort the process: "terminate called without an
        active exception", seen here ~1 in 30 two-rank runs)."""
        if tdist.is_initialized():  # a one-rank group too; gone already where vLLM's shutdown ended it
            if self.world_size > 1:
                tdist.barrier()
            tdist.destroy_process_group()
            gc.collect()

    def barrier(self) -> None:
        if self.world_size > 1:
            tdist.barrier()

    def sum(self, x: float) -> float:
        if self.world_size == 1:
            return x
        return self.sum_tensor(torch.tensor([x], dtype=torch.float64)).item()

    def sum_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (a new tensor; the input is unchanged)."""
        x = x.clone()
        if self.world_size > 1:
            tdist.all_reduce(x)
        return x

    def all_gather(self, obj) -> list:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        out: list = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def reduce_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Combine the ranks' metrics: sums for counts (SUM_KEYS), min/max for extremes, the mean
        over ranks otherwise; a rank's NaN (no valid token) is left out. The ranks' key lists are
        checked to be the same (a mismatch would pair values with the wrong names)."""
        if self.world_size == 1:
            return metrics
        keys = sorted(metrics)
        all_keys: list = [None] * self.world_size
        tdist.all_gather_object(all_keys, keys)
        if any(k != keys for k in all_keys):
            raise RuntimeError(f"ranks logged different metric names: {all_keys}")
        vals = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
        nan = vals.isnan()
        total, count = vals.masked_fill(nan, 0.0), (~nan).double()
        lo, hi = vals.masked_fill(nan, float("inf")), vals.masked_fill(nan, -float("inf"))
        for t, op in ((total, tdist.ReduceOp.SUM), (count, tdist.ReduceOp.SUM),
                      (lo, tdist.ReduceOp.MIN), (hi, tdist.ReduceOp.MAX)):
            tdist.all_reduce(t, op=op)
        out = {}
        for i, k in enumerate(keys):
            if count[i] == 0:
                out[k] = float("nan")
            elif k in SUM_KEYS:
                out[k] = total[i].item()
            elif k.endswith(MIN_SUFFIXES):
                out[k] = lo[i].item()
            elif k.endswith(MAX_SUFFIXES):
                out[k] = hi[i].item()
            else:
                out[k] = total[i].item() / count[i].item()
        return out
