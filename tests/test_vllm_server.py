"""`rollout=vllm_server`: a real vLLM OpenAI server, started by `python -m opd_exp serve` as a
user would in another terminal, sampling for a training run that pushes weights into it."""

import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .conftest import TINY_RUN
from .test_deepspeed import free_port

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def start_server(tiny_world, run_dir: Path, url: str, overrides: list[str]):
    """`python -m opd_exp serve OVERRIDES serve.url=URL` as a user starts it; yields the URL once
    /health answers."""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.update(OPD_EXP_TOY_DIR=str(tiny_world), VLLM_CPU_KVCACHE_SPACE="1")
    log = open(run_dir / "server.log", "w")
    p = subprocess.Popen([sys.executable, "-m", "opd_exp", "serve", *overrides,
                          f"serve.url={url}", f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env, stdout=log,
                         stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            assert p.poll() is None, (run_dir / "server.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(url + "/health", timeout=5)
                break
            except OSError:
                time.sleep(2)
        else:
            pytest.fail("the vLLM server did not come up in 600 s")
        yield url
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=60)
        log.close()


@pytest.fixture(scope="module")
def server(tiny_world, tmp_path_factory):
    url = f"http://127.0.0.1:{free_port()}"
    yield from start_server(tiny_world, tmp_path_factory.mktemp("server"), url, [
        "rollout=vllm_server", f"rollout.server_url={url}", "rollout.max_model_len=256"])


@pytest.fixture(scope="module")
def teacher_server(tiny_world, tmp_path_factory):
    url = f"http://127.0.0.1:{free_port()}"
    yield from start_server(tiny_world, tmp_path_factory.mktemp("teacher_server"), url, [
        "teacher=vllm_server", "serve.role=teacher", f"teacher.server_urls=[{url}]",
        "teacher.max_model_len=256"])


def test_teacher_server_scores_equal_the_in_process_vllm_teacher(teacher_server, tiny_world):
    p = subprocess.run([sys.executable, "-m", "tests.engines.vllm_server_teacher_probe", str(tiny_world),
                        teacher_server], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["positions"] > 100
    assert out["sampled_max_diff"] <= 1e-4 and out["topk_value_max_diff"] <= 1e-4 and out["topk_same_idx"]


def test_train_lsm_with_a_teacher_server(teacher_server, tiny_world, tmp_path):
    p = subprocess.run([sys.executable, "-m", "opd_exp", "train", "+experiment=lsm_toy", "teacher=vllm_server",
                        f"teacher.server_urls=[{teacher_server}]", "objective.k=8", *TINY_RUN,
                        "trainer.steps=2", "eval.every=2", f"hydra.run.dir={tmp_path}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=900,
                       env={**os.environ, "OPD_EXP_TOY_DIR": str(tiny_world)})
    assert p.returncode == 0, p.stderr[-3000:]
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "teacher/eval/avg@2" in recs[1]  # the teacher evaluated by sampling from its server
    assert all(math.isfinite(r["train/loss"]) and r["train/loss"] >= 0 for r in recs if r["step"] > 0)


def test_server_logprobs_match_hf_and_follow_weight_push(server, tiny_world, tmp_path):
    p = subprocess.run([sys.executable, "-m", "tests.engines.vllm_probe", str(tiny_world),
                        str(tmp_path), server], capture_output=True, text=True, cwd=ROOT,
                       timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["rows"] == 12 and out["groups"] == [0] * 4 + [1] * 4 + [2] * 4 and out["stop_ok"]
    assert out["big_rows"] == 33 * 8
    assert out["before"] <= 1e-3  # the server's sampled log-probs = HF forward of the same tokens
    assert out["after_new"] <= 1e-3 and out["after_old"] > 1e-2  # weights pushed over HTTP


def test_train_with_server_rollouts(server, tiny_world, tmp_path):
    p = subprocess.run([sys.executable, "-m", "opd_exp", "train", "rollout=vllm_server",
                        f"rollout.server_url={server}", *TINY_RUN, "trainer.steps=3",
                        "eval.every=3", "eval.teacher=false", f"hydra.run.dir={tmp_path}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=900,
                       env={**os.environ, "OPD_EXP_TOY_DIR": str(tiny_world)})
    assert p.returncode == 0, p.stderr[-3000:]
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2, 3] and "eval/avg@2" in steps[-1]
    for r in steps:
        assert math.isfinite(r["train/loss"]) and r["rollout/logprob_mismatch"] <= 1e-3
        assert r["train/is_weight_mean"] == pytest.approx(1.0, abs=1e-3)
