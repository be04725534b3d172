"""What a GPU node would get, checked on the CPU: the arguments opd_exp hands vLLM there.

- several ranks: vLLM's external launcher (its rank from RANK, not local rank 0 everywhere);
- an engine whose worker is not on the rank's device is refused at start, in one line;
- padded rows excluded by a logit bias on the few padded ids (Qwen3: 267), not by 151,669 allowed
  ids on every request (vLLM's v2 GPU sampler takes at most 1,024);
- `serve` with tensor parallelism and its own memory share (a 32B teacher on GPUs of its own).
"""

import pytest

from opd_exp.config import ConfigError
from opd_exp.engines import rollout_vllm
from opd_exp.engines.rollout_vllm import excluded_rows, launcher_kwargs
from opd_exp.engines.rollout_vllm_server import serve_command

from .conftest import compose


def test_several_ranks_take_vllms_external_launcher(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert launcher_kwargs() == {"distributed_executor_backend": "external_launcher"}
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launcher_kwargs() == {}


class Engine:
    def __init__(self, device):
        self.device, self.rank = device, 3

    def collective_rpc(self, fn):
        return [fn(self)]


def test_an_engine_on_another_device_than_the_ranks_is_refused(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    assert rollout_vllm.check_engine_device(Engine("cpu")) == ("cpu", 3)
    with pytest.raises(RuntimeError, match="vLLM engine of rank 3 runs on cuda:0, not on this rank's cpu"):
        rollout_vllm.check_engine_device(Engine("cuda:0"))


def test_qwen3_padded_rows_are_a_logit_bias_not_every_allowed_id():
    kw = excluded_rows(151669, 151936)
    assert list(kw) == ["logit_bias"] and len(kw["logit_bias"]) == 267
    assert min(kw["logit_bias"]) == 151669 and set(kw["logit_bias"].values()) == {float("-inf")}
    with pytest.raises(ConfigError, match="4000 padded rows past its 1000 tokens"):
        excluded_rows(1000, 5000)  # beyond vLLM's 1,024 biased ids: refused, not a GPU crash


def test_serve_spans_gpus_and_takes_its_own_share():
    cmd = serve_command("http://0.0.0.0:8100", "Qwen/Qwen3-32B", "bfloat16", 0, 0.9, 9216, 40,
                        tensor_parallel_size=4)
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "4"
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.9"
    assert "--tensor-parallel-size" not in serve_command("http://127.0.0.1:8000", "m", "float32", 0, 0.3)


def test_geometry_teacher_serves_from_its_own_gpus():
    cfg = compose(["+experiment=geometry_qwen3", "serve.role=teacher", "serve.tensor_parallel_size=4",
                   "serve.gpu_memory_utilization=0.9"])
    assert cfg.teacher.backend == "vllm_server" and cfg.serve.tensor_parallel_size == 4


def test_more_gpus_than_ranks_is_one_warning_line(monkeypatch, capsys):
    from omegaconf import OmegaConf

    from opd_exp.core.ranks import Dist
    from opd_exp.runtime import distributed

    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 8)
    launcher = OmegaConf.create({"nproc_per_node": 1, "nnodes": 1})
    distributed.check_world(Dist(), launcher)
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["warning: this node has 8 GPUs and the job 1 rank(s) on it: 7 stay idle "
                   "(launcher.nproc_per_node=8 uses them all)"]
    distributed.check_world(Dist(world_size=8), OmegaConf.create({"nproc_per_node": 8, "nnodes": 1}))
    assert capsys.readouterr().out == ""


def test_a_group_of_one_leaves_no_rank_variables_behind(monkeypatch):
    """A one-process DeepSpeed run sets RANK/LOCAL_RANK/WORLD_SIZE for DeepSpeed; a sweep's next
    job in the same process must not be taken for a launched rank."""
    from opd_exp.runtime import distributed

    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    dist = distributed.init("gloo", group_of_one=True)
    assert distributed.launched() and dist.world_size == 1
    dist.close()
    distributed.restore_env()
    assert not distributed.launched()
    assert not distributed.tdist.is_initialized()
    # a run that failed before closing its group: the next job still gets its rank variables
    distributed.init("gloo", group_of_one=True)
    distributed.restore_env()
    assert not distributed.tdist.is_initialized() and not distributed.launched()
    distributed.init("gloo", group_of_one=True)
    assert distributed.os.environ["LOCAL_RANK"] == "0"
    distributed.restore_env()


def test_a_fitting_plan_leaves_the_next_check_on():
    from opd_exp.runtime.memory_plan import check_fits

    assert check_fits(compose(["+experiment=powerOPD_qwen3", "plan.gpu_memory_gib=79.1"])) is not None
    with pytest.raises(ConfigError, match="memory plan"):
        check_fits(compose(["+experiment=powerOPD_qwen3", "plan.gpu_memory_gib=20"]))
