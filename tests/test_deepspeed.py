"""DeepSpeed ZeRO learners and the launcher, for real on this CPU: 2 processes over gloo.

Learner level (tests/engines/ds_probe.py, fixed data): ZeRO-2 / ZeRO-3 on 2 ranks follow the
single-process torch learner's loss curve step by step, parameters are identical on the ranks,
and checkpoint → resume continues exactly. Job level (`python -m opd_exp train`, one command):
2 ranks with vLLM rollouts, a resumed 2-rank run, and two "nodes" joined by torchrun's rendezvous.
"""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import TINY_RUN

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], world: Path, timeout: int = 900, **env) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                       env={**os.environ, "OPD_EXP_TOY_DIR": str(world),
                            "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONFAULTHANDLER": "1", **env})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p


def probe(out: Path, world: Path, *args: str, nproc: int = 1) -> dict:
    launcher = TORCHRUN + [f"--nproc_per_node={nproc}", f"--master_port={free_port()}"] if nproc > 1 else [sys.executable]
    run(launcher + ["-m", "tests.engines.ds_probe", str(out), *args], world)
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def reference(tiny_world, tmp_path_factory):
    """The single-process torch learner on the same 10 fixed batches."""
    out = tmp_path_factory.mktemp("torch_ref")
    return probe(out, tiny_world), torch.load(out / "params.pt")


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_two_ranks_match_torch_learner_and_resume(stage, reference, tiny_world, tmp_path):
    ref, ref_params = reference
    ds = ["learner.backend=deepspeed", f"learner.zero_stage={stage}"]
    got = probe(tmp_path / "run", tiny_world, *ds, "--save-at", "5", nproc=2)
    assert got["world_size"] == 2 and len(got["loss"]) == 10
    # same data, same maths: the 10-step loss and grad-norm curves of one process (float32)
    assert max(abs(a - b) for a, b in zip(got["loss"], ref["loss"])) < 1e-5
    assert max(abs(a - b) / b for a, b in zip(got["grad_norm"], ref["grad_norm"])) < 1e-4
    assert max(ref["grad_norm"]) > 1.0  # max_grad_norm=1 clipped at least one step
    params = torch.load(tmp_path / "run/params.pt")
    assert (params - ref_params).abs().max() < 1e-4
    assert got["rank_param_spread"] == 0.0  # the ranks hold identical weights

    # a fresh job from the step-5 checkpoint (HF student + ZeRO shards) continues exactly
    res = probe(tmp_path / "resumed", tiny_world, *ds, "--save-at", "5",
                "--resume", str(tmp_path / "run/ckpt"), nproc=2)
    assert res["start"] == 5 and res["loss"] == got["loss"][5:]
    assert torch.equal(torch.load(tmp_path / "resumed/params.pt"), params)


@pytest.mark.parametrize("stage,precision,offload", [(1, "fp32", False), (2, "fp32", True),
                                                     (3, "bf16", False)])
def test_zero_options_follow_torch_learner(stage, precision, offload, reference, tiny_world, tmp_path):
    """ZeRO-1, optimizer offload to CPU, bf16 weights with fp32 master weights."""
    ref, ref_params = reference
    got = probe(tmp_path, tiny_world, "learner.backend=deepspeed", f"learner.zero_stage={stage}",
                f"learner.precision={precision}", f"learner.offload_optimizer={offload}", nproc=2)
    assert got["rank_param_spread"] == 0.0
    loss_d = [abs(a - b) for a, b in zip(got["loss"], ref["loss"])]
    norm_r = [abs(a - b) / b for a, b in zip(got["grad_norm"], ref["grad_norm"])]
    if precision == "fp32":
        assert max(loss_d) < 1e-5 and max(norm_r) < 1e-4
        assert (torch.load(tmp_path / "params.pt") - ref_params).abs().max() < 1e-4
    else:  # bf16 forward/backward: the same curve at bf16 resolution over the first steps
        assert max(loss_d[:4]) < 2e-3 and max(norm_r[:4]) < 0.05
        assert max(loss_d) < 0.02


@pytest.mark.parametrize("extra", [["learner.packing=true"], ["objective=topk", "objective.k=4"]])
def test_zero2_offload_where_the_backbone_is_called_alone_follows_torch_learner(extra, tiny_world, tmp_path):
    """Packing and the LM-head objectives run the student's backbone itself, not through the
    engine's forward (whose hooks open ZeRO's backward: accumulation boundary): two micro-batches
    a rank, optimizer offload — still the torch learner's losses and gradient norms (a lost
    micro-batch would move a norm by tens of percent) and, for the sampled-token objective, its
    weights. With top-K a handful of LM-head (tied embedding) entries drift by ~lr — 5 of 74k
    here, every other weight within 1e-5: most likely gradients at rounding level whose sign the
    other summation order flips, which AdamW turns into steps of ~lr (DeepSpeed with and without
    offload agree with each other)."""
    ref = probe(tmp_path / "torch", tiny_world, *extra)
    got = probe(tmp_path / "ds", tiny_world, "learner.backend=deepspeed", "learner.zero_stage=2",
                "learner.offload_optimizer=true", *extra, nproc=2)
    assert max(abs(a - b) for a, b in zip(got["loss"], ref["loss"])) < 1e-5
    norm_r = [abs(a - b) / b for a, b in zip(got["grad_norm"], ref["grad_norm"])]
    assert norm_r[0] < 1e-5 and max(norm_r) < 1e-3
    diff = torch.load(tmp_path / "ds/params.pt") - torch.load(tmp_path / "torch/params.pt")
    if "objective=topk" in extra:
        assert (diff.abs() > 1e-4).sum() <= 16 and diff.abs().max() < 2 * 5e-3
    else:
        assert diff.abs().max() < 1e-4


def test_sharded_evaluation_equals_one_process(tiny_world, tmp_path):
    """Each rank samples its share of the problems; the reduced scores are the whole benchmark's."""
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    run([sys.executable, "-m", "tests.engines.eval_probe", str(one)], tiny_world)
    run(TORCHRUN + ["--nproc_per_node=2", f"--master_port={free_port()}", "-m",
                    "tests.engines.eval_probe", str(two)], tiny_world)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=1e-12) for k in a)
    assert 0 < a["avg@4"] < 1 and a["pass@4"] > a["avg@4"]  # the script gives mixed counts


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_cmd(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "opd_exp", "train", *TINY_RUN, "learner=deepspeed",
            "eval.teacher=false", *overrides]


def test_one_process_deepspeed_trains_without_a_launcher(tiny_world, tmp_path):
    """`python -m opd_exp train learner=deepspeed` in a plain process: no rank variables, so
    DeepSpeed's own init would try MPI discovery (`import mpi4py`, not installed) and crash; the
    run makes a one-rank group and trains."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    p = subprocess.run(train_cmd("trainer.steps=2", "eval.every=0", f"hydra.run.dir={tmp_path}"),
                       capture_output=True, text=True, cwd=ROOT, timeout=900,
                       env={**env, "OPD_EXP_TOY_DIR": str(tiny_world)})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert "torch.distributed.run" not in p.stdout  # no launcher underneath
    steps = [r for r in records(tmp_path) if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2] and all(math.isfinite(r["train/loss"]) for r in steps)
    assert (tmp_path / "checkpoints/step_000002/deepspeed/state").is_dir()


def test_two_ranks_vllm_rollouts_deepspeed_learner_one_command(tiny_world, tmp_path):
    p = run(train_cmd("rollout=vllm", "rollout.max_model_len=256", "launcher.nproc_per_node=2",
                      f"launcher.master_port={free_port()}", "learner.zero_stage=3",
                      "trainer.steps=3", "eval.every=3", f"hydra.run.dir={tmp_path}"), tiny_world)
    assert "torch.distributed.run" in p.stdout and "--nproc_per_node=2" in p.stdout
    assert "Invalid process group" not in p.stderr  # each rank's engine shut down, not finalized at exit
    steps = [r for r in records(tmp_path) if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2, 3]  # rank 0 alone logs: one record per step
    for r in steps:
        assert math.isfinite(r["train/loss"]) and math.isfinite(r["train/grad_norm"])
        assert r["rollout/logprob_mismatch"] <= 1e-3  # each rank's engine follows the learner
        # 4 prompts x 2 samples over 2 ranks: the token count is the sum of both shards
        assert r["rollout/tokens"] > r["rollout/response_len"] * 4
    assert "eval/avg@2" in steps[-1]
    assert (tmp_path / "rank0/vllm_weights").is_dir() and (tmp_path / "rank1/vllm_weights").is_dir()
    # each rank's engine: vLLM's external launcher (its rank from RANK, not local rank 0 on every
    # rank), on the rank's own device, its own weights folder
    engines = [json.loads((tmp_path / f"rank{r}/vllm_engine.json").read_text()) for r in (0, 1)]
    for r, e in enumerate(engines):
        assert e["distributed_executor_backend"] == "external_launcher" and e["rank"] == str(r)
        assert e["worker_rank"] == r  # its compile cache: rank_<r>_0, one folder per rank
        assert e["device"] == "cpu" and e["model"] == str(tmp_path / f"rank{r}/vllm_weights")
    ckpt = tmp_path / "checkpoints/step_000003"
    assert (ckpt / "student/model.safetensors").is_file()  # gathered from ZeRO-3 shards
    assert len(list((ckpt / "deepspeed/state").glob("*optim_states.pt"))) == 2  # one per rank


def test_two_rank_resume_continues_exactly(tiny_world, tmp_path):
    """4 steps straight == 2 steps then resumed to 4, with 2 ranks (ZeRO-2, HF rollouts), token
    and parameter diagnostics on (the ranks log the same metric names; reduced, resumed exactly)."""
    base = ["launcher.nproc_per_node=2", "eval.every=0", "trainer.save_every=2", "diag.every=1",
            "diag.param_every=2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for extra, d in ((["trainer.steps=4"], straight), (["trainer.steps=2"], resumed),
                     (["trainer.steps=4", "trainer.resume=true"], resumed)):
        run(train_cmd(*base, *extra, f"launcher.master_port={free_port()}", f"hydra.run.dir={d}"),
            tiny_world)
    from safetensors.torch import load_file

    a = load_file(straight / "checkpoints/step_000004/student/model.safetensors")
    b = load_file(resumed / "checkpoints/step_000004/student/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    drop = lambda r: {k: v for k, v in r.items() if not k.endswith("seconds")}  # noqa: E731
    assert [drop(r) for r in records(straight)] == [drop(r) for r in records(resumed)]
    last = records(straight)[-1]
    assert 0 < last["diag/token/mass_teacher"] <= 1 and "diag/param/all/sparsity" in last


def test_two_nodes_emulated_on_loopback(tiny_world, tmp_path):
    """Two launcher invocations, one process each, join as nodes 0 and 1 of one job: the same
    command a user runs on two machines, with node 0's address instead of 127.0.0.1."""
    port = free_port()
    cmds = [train_cmd("launcher.nnodes=2", f"launcher.node_rank={i}", "launcher.master_addr=127.0.0.1",
                      f"launcher.master_port={port}", "trainer.steps=2", "eval.every=0",
                      f"hydra.run.dir={tmp_path}") for i in (0, 1)]
    env = {**os.environ, "OPD_EXP_TOY_DIR": str(tiny_world)}
    procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for c in cmds]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-2000:] + err[-4000:]
    assert all("--nnodes=2" in out for out, _ in outs)
    steps = [r for r in records(tmp_path) if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2] and all(math.isfinite(r["train/loss"]) for r in steps)
    assert json.loads((tmp_path / "checkpoints/step_000002/state.json").read_text())["step"] == 2


@pytest.mark.parametrize("stage", [2, 3])
def test_a_nan_loss_never_reaches_the_weights_under_deepspeed(tiny_world, stage):
    """DeepSpeed skips an update whose gradient norm is not finite (and its LR step); our
    learner reports it as train/skipped_steps, like the torch learner."""
    p = subprocess.run([sys.executable, "-m", "tests.engines.ds_nan_probe", str(tiny_world),
                        str(stage), str(free_port())], capture_output=True, text=True, cwd=ROOT,
                       timeout=600, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["skipped"] == 1 and out["norm"] == math.inf and out["same"] and out["finite"]
    assert out["then_changed"] and out["skipped2"] == 0
