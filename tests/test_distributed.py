"""Rank bookkeeping (opd_exp/core/ranks.py, opd_exp/runtime/distributed.py) on 2 real processes over gloo, no launcher."""

import json

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from opd_exp.config import ConfigError
from opd_exp.core.ranks import Dist
from opd_exp.runtime.distributed import check_world

from .test_deepspeed import free_port


def _worker(rank: int, port: int, out: str) -> None:
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    d = Dist(rank=rank, world_size=2, local_rank=rank)
    m = d.reduce_metrics({"rollout/tokens": [10.0, 30.0][rank], "reward/min": [-1.0, -5.0][rank],
                          "train/grad_norm_max": [2.0, 1.0][rank], "train/loss": [1.0, 3.0][rank],
                          "reward/p50": [0.5, float("nan")][rank],  # rank 1: no valid token
                          "reward/max": float("nan")})
    shard = d.shard(list(range(7)))
    summed = d.sum_tensor(torch.tensor([1.0, rank])).tolist()
    try:
        d.reduce_metrics({"a": 1.0} if rank == 0 else {"b": 1.0})
        mismatch = "accepted"
    except RuntimeError as e:
        mismatch = str(e)
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"m": m, "shard": shard, "summed": summed, "mismatch": mismatch}, f)
    tdist.destroy_process_group()


def test_reduce_metrics_shards_and_key_check(tmp_path):
    out = str(tmp_path / "r")
    mp.spawn(_worker, args=(free_port(), out), nprocs=2, join=True)
    r0, r1 = (json.loads(open(f"{out}.{i}").read()) for i in (0, 1))
    assert r0["m"] == r1["m"]  # every rank gets the same reduced numbers
    m = r0["m"]
    assert m["rollout/tokens"] == 40.0 and m["reward/min"] == -5.0 and m["train/grad_norm_max"] == 2.0
    assert m["train/loss"] == 2.0 and m["reward/p50"] == 0.5  # NaN rank left out of the mean
    assert m["reward/max"] != m["reward/max"]  # NaN on every rank stays NaN
    assert r0["shard"] == [0, 2, 4, 6] and r1["shard"] == [1, 3, 5]
    assert r0["summed"] == [2.0, 1.0]
    assert "different metric names" in r0["mismatch"] and "different metric names" in r1["mismatch"]


def test_world_size_must_match_the_launcher_config():
    check_world(Dist(), OmegaConf.create({"nproc_per_node": 1, "nnodes": 1}))
    with pytest.raises(ConfigError, match=r"^launcher.nproc_per_node \* launcher.nnodes = 2 is not"):
        check_world(Dist(), OmegaConf.create({"nproc_per_node": 2, "nnodes": 1}))


def _zscore_worker(rank: int, port: int, out: str) -> None:
    from opd_exp.methods.rewards import RewardInputs, zscore

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    d = Dist(rank=rank, world_size=2, local_rank=rank)
    x = _zscore_inputs()
    rows = slice(0, 2) if rank == 0 else slice(2, 5)  # unequal shards, unequal token counts
    mine = RewardInputs(x.logq_B_T[rows], x.logp_B_T[rows], x.mask_B_T[rows], x.group_B[rows],
                        sum_over_ranks=d.sum_tensor)
    torch.save(zscore(mine, OmegaConf.create({"eps": 1e-6})), f"{out}.{rank}")
    tdist.destroy_process_group()


def _zscore_inputs():
    from opd_exp.methods.rewards import RewardInputs

    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(5, 7, generator=g) > 0.3).double()
    mask[0] = 1.0
    return RewardInputs(torch.randn(5, 7, generator=g, dtype=torch.float64) * 3,
                        torch.randn(5, 7, generator=g, dtype=torch.float64), mask, torch.arange(5))


def test_zscore_standardises_over_the_whole_step_across_ranks(tmp_path):
    """reward=zscore on 2 ranks = one process holding the whole step (SPEC §1.2)."""
    from opd_exp.methods.rewards import zscore

    out = str(tmp_path / "z")
    mp.spawn(_zscore_worker, args=(free_port(), out), nprocs=2, join=True)
    got = torch.cat([torch.load(f"{out}.{i}") for i in (0, 1)])
    whole = zscore(_zscore_inputs(), OmegaConf.create({"eps": 1e-6}))
    assert torch.allclose(got, whole, atol=1e-12)
    assert ((got * _zscore_inputs().mask_B_T).sum() / _zscore_inputs().mask_B_T.sum()).abs() < 1e-12
