"""`rollout.sleep`: which sleep level, and what waking from each does — against a stand-in engine
that records its calls (this CPU build of vLLM has no sleep mode). Level 2 discards the weights,
so every waking loads the learner's current weights before anything samples; level 1 keeps them."""

import pytest
import torch

from opd_exp.config import schema_cfg
from opd_exp.engines import rollout_vllm
from opd_exp.engines.rollout_vllm import VLLMRollout


class Model(torch.nn.Linear):
    def __init__(self):
        super().__init__(2, 2)

    def get_output_embeddings(self):
        return self


class Engine:
    def __init__(self):
        self.calls = []

    def sleep(self, level):
        self.calls.append(f"sleep{level}")

    def wake_up(self):
        self.calls.append("wake")

    def collective_rpc(self, name, kwargs):
        list(kwargs.get("weights_iterator", []))
        self.calls.append(name)

    def reset_prefix_cache(self):
        pass


def rollout(level: int) -> VLLMRollout:
    r = VLLMRollout.__new__(VLLMRollout)  # no engine to start: its state as __init__ leaves it
    r.llm, r.sleep, r.asleep, r.sleep_level = Engine(), True, False, level
    r.sync_every, r.calls, r.weight_sync, r.model = 1, 0, "memory", Model()
    return r


def asleep(r: VLLMRollout) -> VLLMRollout:
    r.llm.sleep(level=r.sleep_level)  # as generate() leaves it
    r.asleep = True
    return r


def test_level_two_reloads_the_weights_on_waking_even_without_a_sync(monkeypatch):
    """Step 0's evaluation, then step 1's sampling, no update between: the weights that level 2
    discarded come back before sampling."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    r = asleep(rollout(2))
    r._wake()
    assert r.llm.calls == ["sleep2", "wake", "reload_weights"]


def test_a_sync_after_level_two_loads_once(monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    r = asleep(rollout(2))
    new = Model()
    r.sync_weights(new)
    assert r.llm.calls == ["sleep2", "wake", "reload_weights"] and r.model is new


def test_level_one_keeps_the_weights(monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    r = asleep(rollout(1))
    r._wake()
    assert r.llm.calls == ["sleep1", "wake"]


@pytest.mark.parametrize("sync_every,staleness,level", [(1, 0, 2), (2, 0, 1), (1, 1, 1)])
def test_level_two_only_where_every_sampling_follows_a_sync(sync_every, staleness, level, monkeypatch):
    seen = {}
    monkeypatch.setattr(rollout_vllm, "VLLMRollout", lambda *a, **kw: seen.update(kw))
    cfg = schema_cfg({"rollout": {"backend": "vllm", "sleep": True, "sync_every": sync_every,
                                  "max_staleness": staleness}})
    rollout_vllm.make(cfg, None, None, set(), "/tmp")
    assert seen["sleep_level"] == level
