"""What a hub teacher does to the vLLM teacher paths that the toy teacher forgives: a pinned
revision, remote code, and a context vLLM fills exactly. No vLLM is started: the engine and the
server command are captured where they would start."""

import subprocess

import pytest

from opd_exp.commands import run_serve
from opd_exp.engines import teacher_vllm
from opd_exp.engines.hf_models import load_tokenizer
from opd_exp.loop.build import prompt_pool

from .conftest import TINY_RUN, compose

PIN = ["pair.teacher.revision=0123abc", "pair.teacher.trust_remote_code=true"]


def test_the_in_process_vllm_teacher_loads_the_pinned_revision(use_tiny_world, monkeypatch):
    seen = {}
    monkeypatch.setattr(teacher_vllm, "start_engine", lambda *a, **kw: seen.update(kw))
    cfg = compose([*TINY_RUN, "teacher=vllm", *PIN])
    teacher_vllm.make(cfg, load_tokenizer(cfg.pair.student, "pair.student"), set())
    assert seen["revision"] == seen["tokenizer_revision"] == "0123abc"
    assert seen["trust_remote_code"] is True


def test_a_teacher_server_is_started_on_the_pinned_revision(use_tiny_world, monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: seen.append(cmd) or
                        subprocess.CompletedProcess(cmd, 0))
    cfg = compose([*TINY_RUN, "teacher=vllm_server", "teacher.server_urls=[http://127.0.0.1:8123]",
                   "serve.role=teacher", *PIN])
    assert run_serve(cfg, tmp_path) == 0
    cmd = " ".join(seen[0])
    assert "--revision 0123abc --tokenizer-revision 0123abc --trust-remote-code" in cmd


@pytest.mark.parametrize("backend,kept", [("hf", 2), ("vllm", 1), ("vllm_server", 1)])
def test_a_vllm_teacher_leaves_room_for_the_token_it_must_generate(use_tiny_world, backend, kept):
    """prompt + response as long as the teacher's context: the HF teacher scores it, vLLM refuses
    a prompt that fills its context (it must generate one token after it)."""
    cfg = compose([*TINY_RUN, f"teacher.backend={backend}", "rollout.max_new_tokens=12",
                   "data.pool_size=2", "prompts.dedup=none"])
    lengths = {}

    def encode(prompt: str) -> list[int]:  # the two prompts: 20 and 21 tokens
        lengths.setdefault(prompt, 20 + len(lengths))
        return [0] * lengths[prompt]

    pool = prompt_pool(cfg, [encode], [21 + 12])
    assert len(pool.pool) == kept and pool.skipped["skipped_too_long"] == 2 - kept

