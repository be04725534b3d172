"""`rollout=vllm_server` and `teacher=vllm_server`: real vLLM OpenAI servers, started by
`python -m opd_exp serve` as a user would in another terminal, each behind the guard with a shared
secret (opd_exp/engines/server_guard.py), sampling for and scoring a training run that pushes
weights into the student's."""

import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .conftest import TINY_RUN
from .test_deepspeed import free_port

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


TOKEN = "the-runs-secret-" + "7f3a9c" * 4


@pytest.fixture(scope="module")
def secret(tmp_path_factory) -> Path:
    """The shared secret's file (mode 600) the servers are started with and the run sends."""
    f = tmp_path_factory.mktemp("secret") / "token"
    f.write_text(TOKEN + "\n")
    f.chmod(0o600)
    return f


def start_server(tiny_world, run_dir: Path, url: str, overrides: list[str]):
    """`python -m opd_exp serve OVERRIDES serve.url=URL` as a user starts it; yields the URL once
    /health answers (open without the secret). vLLM's caches go under RUN_DIR (searched for the
    secret)."""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.update(OPD_EXP_TOY_DIR=str(tiny_world), VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_CACHE_ROOT=str(run_dir / "vllm_cache"))
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
def server(tiny_world, tmp_path_factory, secret):
    url = f"http://127.0.0.1:{free_port()}"
    yield from start_server(tiny_world, tmp_path_factory.mktemp("server"), url, [
        "rollout=vllm_server", f"rollout.server_url={url}", "rollout.max_model_len=256",
        f"serve.token_file={secret}"])


@pytest.fixture(scope="module")
def teacher_server(tiny_world, tmp_path_factory, secret):
    url = f"http://127.0.0.1:{free_port()}"
    yield from start_server(tiny_world, tmp_path_factory.mktemp("teacher_server"), url, [
        "teacher=vllm_server", "serve.role=teacher", f"teacher.server_urls=[{url}]",
        "teacher.max_model_len=256", f"serve.token_file={secret}"])


def post(url: str, path: str, body: dict | None, token: str | None = None) -> tuple[int, dict]:
    """(HTTP status, JSON answer) of a POST (GET without a body)."""
    req = urllib.request.Request(url + path, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            text = resp.read().decode()
            return resp.status, json.loads(text) if text.strip() else {}
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode() or "{}")


def scored(url: str, token: str) -> list:
    """The server's log-probs of a fixed token sequence (prompt_logprobs, top-3): its weights."""
    model = post(url, "/v1/models", None, token)[1]["data"][0]["id"]
    code, out = post(url, "/v1/completions", {"model": model, "prompt": [[5, 17, 33, 2, 91, 12, 7, 40]],
                                              "max_tokens": 1, "prompt_logprobs": 3, "temperature": 1.0}, token)
    assert code == 200, out
    return out["choices"][0]["prompt_logprobs"]


def test_without_the_secret_the_servers_answer_401_and_change_nothing(server, teacher_server, tiny_world,
                                                                       tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from opd_exp.engines.rollout_vllm import save_untied

    before = scored(server, TOKEN)
    # weights a reload would take (the student, perturbed), in a folder outside the server's
    evil = AutoModelForCausalLM.from_pretrained(tiny_world / "student")
    with torch.no_grad():
        for p in evil.parameters():
            p.add_(torch.randn_like(p))
    save_untied(evil, tmp_path / "evil")
    rpc = {"method": "reload_weights", "kwargs": {"weights_path": str(tmp_path / "evil"),
                                                  "is_checkpoint_format": True}}
    for token in (None, "a-wrong-secret-0123456789"):
        for path, body in (("/v1/completions", {"prompt": [[5, 17]], "max_tokens": 1}),
                           ("/v1/models", None), ("/collective_rpc", rpc), ("/sleep", {}), ("/wake_up", {}),
                           ("/reset_prefix_cache", {}), ("/metrics", None)):
            assert post(server, path, body, token)[0] == 401, (path, token)
            assert post(teacher_server, path, body, token)[0] == 401, (path, token)
    assert post(server, "/health", None)[0] == 200
    # with the secret: a reload from outside the folder the server was started for, or any other
    # worker method, is refused all the same
    for path, body in (("/collective_rpc", rpc), ("/collective%5Frpc", rpc), ("/collective_rpc/", rpc),
                       ("/collective_rpc", {"method": "sleep", "kwargs": {"level": 1}})):
        code, out = post(server, path, body, TOKEN)
        assert code == 403 and out["error"].startswith("collective_rpc refused"), (path, out)
    # and the dev routes a run never calls (/weight_checker zeroes the weights), secret or not
    for path, body in (("/weight_checker", {"action": "reset"}), ("/pause", {}), ("/sleep", {}),
                       ("/update_weights", {})):
        code, out = post(server, path, body, TOKEN)
        assert code == 403 and "is not served" in out["error"], (path, out)
    assert post(teacher_server, "/collective_rpc", rpc, TOKEN)[0] == 403
    assert scored(server, TOKEN) == before  # nothing reached the weights


def test_a_run_without_the_secret_stops_in_one_line(server, tiny_world, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OPD_EXP_SERVER_TOKEN_FILE"}
    p = subprocess.run([sys.executable, "-m", "opd_exp", "train", "rollout=vllm_server",
                        f"rollout.server_url={server}", *TINY_RUN, "trainer.steps=1",
                        f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, cwd=ROOT, timeout=900,
                       env={**env, "OPD_EXP_TOY_DIR": str(tiny_world)})
    assert p.returncode == 1, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {server}/v1/models: HTTP 401: the server wants the shared secret")
    assert "Traceback" not in p.stderr


def test_teacher_server_scores_equal_the_in_process_vllm_teacher(teacher_server, tiny_world, secret):
    p = subprocess.run([sys.executable, "-m", "tests.engines.vllm_server_teacher_probe", str(tiny_world),
                        teacher_server], capture_output=True, text=True, cwd=ROOT, timeout=900,
                       env={**os.environ, "OPD_EXP_SERVER_TOKEN_FILE": str(secret)})
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["positions"] > 100
    assert out["sampled_max_diff"] <= 1e-4 and out["topk_value_max_diff"] <= 1e-4 and out["topk_same_idx"]


def test_train_lsm_with_a_teacher_server(teacher_server, tiny_world, tmp_path, secret):
    p = subprocess.run([sys.executable, "-m", "opd_exp", "train", "+experiment=lsm_toy", "teacher=vllm_server",
                        f"teacher.server_urls=[{teacher_server}]", "objective.k=8", *TINY_RUN,
                        "trainer.steps=2", "eval.every=2", f"hydra.run.dir={tmp_path}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=900,
                       env={**os.environ, "OPD_EXP_TOY_DIR": str(tiny_world),
                            "OPD_EXP_SERVER_TOKEN_FILE": str(secret)})  # the secret's other way in
    assert p.returncode == 0, p.stderr[-3000:]
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "teacher/eval/avg@2" in recs[1]  # the teacher evaluated by sampling from its server
    assert all(math.isfinite(r["train/loss"]) and r["train/loss"] >= 0 for r in recs if r["step"] > 0)


def test_server_logprobs_match_hf_and_follow_weight_push(server, tiny_world, tmp_path, secret):
    p = subprocess.run([sys.executable, "-m", "tests.engines.vllm_probe", str(tiny_world),
                        str(tmp_path), server], capture_output=True, text=True, cwd=ROOT,
                       timeout=900, env={**os.environ, "OPD_EXP_SERVER_TOKEN_FILE": str(secret)})
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["rows"] == 12 and out["groups"] == [0] * 4 + [1] * 4 + [2] * 4 and out["stop_ok"]
    assert out["big_rows"] == 33 * 8
    assert out["rewritten"]  # each push in a folder of its own, the previous one removed
    assert out["before"] <= 1e-3  # the server's sampled log-probs = HF forward of the same tokens
    assert out["after_new"] <= 1e-3 and out["after_old"] > 1e-2  # weights pushed over HTTP


def test_train_with_both_servers_behind_the_secret(server, teacher_server, tiny_world, tmp_path, secret,
                                                   tmp_path_factory):
    p = subprocess.run([sys.executable, "-m", "opd_exp", "train", "rollout=vllm_server",
                        f"rollout.server_url={server}", "teacher=vllm_server",
                        f"teacher.server_urls=[{teacher_server}]", f"serve.token_file={secret}", *TINY_RUN,
                        "trainer.steps=2", "eval.every=2", "eval.teacher=false", f"hydra.run.dir={tmp_path}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=900,
                       env={**os.environ, "OPD_EXP_TOY_DIR": str(tiny_world)})
    assert p.returncode == 0, p.stderr[-3000:]
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2] and "eval/avg@2" in steps[-1]
    for r in steps:
        assert math.isfinite(r["train/loss"]) and r["rollout/logprob_mismatch"] <= 1e-3
        assert r["train/is_weight_mean"] == pytest.approx(1.0, abs=1e-3)
    # the secret is in no file the run or the servers wrote (their folders, vLLM's caches, logs)
    base = tmp_path_factory.getbasetemp()
    folders = [tmp_path, *base.glob("server*"), *base.glob("teacher_server*")]
    written = [f for d in folders for f in d.rglob("*") if f.is_file()]
    assert len(written) > 20 and not [f for f in written if TOKEN.encode() in f.read_bytes()]


@pytest.fixture(scope="module")
def xtok_teacher_server(tiny_world, tmp_path_factory, secret):
    """The tiny world's Qwen3.6 teacher served for its Qwen3 student (another tokenizer)."""
    url = f"http://127.0.0.1:{free_port()}"
    yield from start_server(tiny_world, tmp_path_factory.mktemp("xtok_teacher_server"), url, [
        "+experiment=cross_tokenizer_toy", "pair.student.path=toy:qwen3_student", "teacher=vllm_server",
        "serve.role=teacher", f"teacher.server_urls=[{url}]", "teacher.max_model_len=256",
        f"serve.token_file={secret}"])


def test_a_teacher_server_with_another_tokenizer_gives_the_in_process_chunk_scores(
        xtok_teacher_server, tiny_world, secret):
    p = subprocess.run([sys.executable, "-m", "tests.engines.vllm_xtok_server_probe", str(tiny_world),
                        xtok_teacher_server], capture_output=True, text=True, cwd=ROOT, timeout=900,
                       env={**os.environ, "OPD_EXP_SERVER_TOKEN_FILE": str(secret)})
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["positions"] > 50 and out["chunks"] > 50 and out["aligned_share"] > 0.5
    assert out["same_chunks"] and out["topk_same_support"] and out["topk_same_idx"]
    assert out["sampled_max_diff"] <= 1e-4 and out["topk_value_max_diff"] <= 1e-4
