"""Shared fixtures: a tiny toy world (random-ish models, seconds to build) and config composition."""

from __future__ import annotations

import os

import pytest

from opd_exp.toyworld.build import ModelSpec, build_world

TINY_TEACHER = ModelSpec("teacher", layers=1, hidden=64, intermediate=128, levels=(1, 2),
                         steps=4, batch_size=8, heads=2, kv_heads=1)


@pytest.fixture(scope="session", autouse=True)
def qwen_vocab_cache(tmp_path_factory):
    """The real Qwen tokenizers and the lifted real-vocabulary toy models of a session are built
    into a temp folder (opd_exp/toyworld/qwen_vocab.py, qwen_models.py), never the user's cache."""
    from opd_exp.toyworld.qwen_vocab import CACHE_ENV

    old, root = os.environ.get(CACHE_ENV), tmp_path_factory.mktemp("qwen_vocab")
    os.environ[CACHE_ENV] = str(root)
    yield root
    if old is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = old


TINY_FAMILIES = ["qwen3", "qwen36"]  # the real-vocabulary models of the tiny world (qwen_models.py)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory, qwen_vocab_cache):
    """The pair, the condition models, the Qwen3-vocabulary family (toy:qwen3_teacher,
    toy:qwen3_student) and the Qwen3.6-vocabulary teacher, a few steps each."""
    from opd_exp.toyworld.qwen_models import add_families

    out = tmp_path_factory.mktemp("toy") / "world"
    build_world(out, seed=0, teacher=TINY_TEACHER, student_step=2, progress=False, log=lambda *a: None)
    return add_families(out, TINY_FAMILIES, progress=False, log=lambda *a: None)


@pytest.fixture
def use_tiny_world(tiny_world, monkeypatch):
    monkeypatch.setenv("OPD_EXP_TOY_DIR", str(tiny_world))
    return tiny_world


def compose(overrides: list[str] = (), return_hydra_config: bool = False):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from opd_exp.__main__ import CONF_DIR
    from opd_exp.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides),
                             return_hydra_config=return_hydra_config)


def sweep_jobs(args: list[str]) -> list[list[str]]:
    """The jobs of `python -m opd_exp train --multirun ARGS`, each an override list in the order
    Hydra's basic sweeper composes it: the sweep file's hydra.sweeper.params first, then the
    command line (a key given in both keeps the params' place and the command line's value)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in args if a != "--multirun"]
    parser = OverridesParser.create()
    plain = [o.input_line for o in parser.parse_overrides(args) if not o.is_sweep_override()]
    params = compose(plain, return_hydra_config=True).hydra.sweeper.params or {}
    overrides = parser.parse_overrides([f"{k}={v}" for k, v in params.items()] + args)
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


# tiny, fast overrides for end-to-end runs on the tiny world
TINY_RUN = [
    "logger.mode=disabled", "logger.plots=false", "data.prompts_per_step=4", "rollout.n=2",
    "rollout.max_new_tokens=12", "eval.max_problems=3", "eval.k=2", "eval.max_new_tokens=12",
    "eval.benchmarks=[toy_L1,toy_L2]", "data.pool_size=64", "learner.micro_batch_size=3",
]


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen_vocab_cache):
    """`qwen_tokenizer(name)`: a real Qwen tokenizer (opd_exp/toyworld/qwen_vocab.py), built once
    per session into the session's cache folder."""
    from opd_exp.toyworld import qwen_vocab

    loaded = {}

    def get(name: str):
        if name not in loaded:
            loaded[name] = qwen_vocab.load(name)
        return loaded[name]
    return get
