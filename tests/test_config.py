"""Every config option and experiment composes; bad values fail with one line naming the field."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from opd_exp.__main__ import CONF_DIR
from opd_exp.config import GROUP_SCHEMAS, ConfigError, validate

from .conftest import compose

GROUP_OPTIONS = [(g, p.stem) for g in GROUP_SCHEMAS for p in sorted((Path(CONF_DIR) / g).glob("*.yaml"))]
EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("group,option", GROUP_OPTIONS)
def test_every_group_option_composes_and_validates(group, option):
    validate(compose([f"{group}={option}"]))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_validates(name):
    cfg = compose([f"+experiment={name}"])
    validate(cfg, on_this_machine=False)  # the GPU experiments' sleep mode needs CUDA
    assert cfg.experiment == name


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_files_start_with_package_then_command(name):
    lines = (Path(CONF_DIR) / "experiment" / f"{name}.yaml").read_text().splitlines()
    assert lines[0] == "# @package _global_"  # Hydra reads the header only before other lines
    assert lines[1] == f"# python -m opd_exp train +experiment={name}"


def test_group_yaml_holds_no_defaults_twice():
    """YAML files only change the schema: no value may equal the schema default it overrides,
    except `name`/`backend`/`source` selectors, which document the option."""
    for group, schema in GROUP_SCHEMAS.items():
        base = OmegaConf.structured(schema)
        for path in (Path(CONF_DIR) / group).glob("*.yaml"):
            y = OmegaConf.load(path)
            for key in y:
                if key in ("name", "backend", "source", "defaults"):
                    continue
                assert y[key] != base.get(key), f"{path.name}: {key} repeats the schema default"


def test_powerOPD_qwen3_names_both_models():
    cfg = compose(["+experiment=powerOPD_qwen3"])
    assert cfg.pair.student.path == "Qwen/Qwen3-1.7B-Base"
    assert cfg.pair.teacher.path == "Qwen/Qwen3-4B"
    assert cfg.rollout.backend == "vllm" and cfg.learner.backend == "deepspeed"
    validate(compose(["+experiment=powerOPD_qwen3", "launcher.nproc_per_node=8"]))  # 1 prompt/rank


def test_unknown_key_fails_at_composition():
    with pytest.raises(ConfigCompositionException):
        compose(["reward.alhpa=0.5"])
    with pytest.raises(ConfigCompositionException):
        compose(["reward.alpha=abc"])


@pytest.mark.parametrize("override,field", [
    ("reward.alpha=-1", "reward.alpha"), ("reward.alpha=0", "reward.alpha"),
    ("reward.name=nope", "reward.name"), ("objective.gamma=1.5", "objective.gamma"),
    ("rollout.top_p=0", "rollout.top_p"), ("learner.lr=0", "learner.lr"),
    ("data.levels=[7]", "data.levels"), ("eval.k=0", "eval.k"), ("logger.mode=loud", "logger.mode"),
    ("learner.minibatches=3", "learner.minibatches"), ("objective.name=nope", "objective.name"),
    ("teacher=vllm objective=full_vocab", "teacher.backend"),
    ("teacher=vllm +experiment=lsm_toy objective.support=union", "teacher.backend"),
    ("learner.zero_stage=4", "learner.zero_stage"),
    ("learner=deepspeed learner.zero_stage=3 objective=topk", "learner.zero_stage"),
    ("learner=deepspeed learner.deepspeed_config=/no/such.json", "learner.deepspeed_config"),
    ("launcher.nproc_per_node=2", "learner.backend"),
    ("learner=deepspeed launcher.nproc_per_node=3", "data.prompts_per_step"),
    ("launcher.node_rank=1", "launcher.node_rank"), ("rollout.sleep=true", "rollout.sleep"),
    ("rollout=vllm_server learner=deepspeed launcher.nproc_per_node=2", "rollout.backend"),
    ("rollout.server_url=localhost:8000", "rollout.server_url"),
    ("schedule=cold_start learner=deepspeed", "schedule.name"),
    ("learner.betas=[0.9]", "learner.betas"), ("learner.betas=[0.9,0.99,0.5]", "learner.betas"),
    ("trainer.max_skipped_steps=0", "trainer.max_skipped_steps"),
    ("pair.teacher_prompt=teacher", "pair.teacher_prompt"), ("data.source=web", "data.source"),
    ("data.source=file", "data.path"), ("objective=full_vocab objective.mask_unshared=true",
                                        "objective.mask_unshared"),
])
def test_validation_names_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        validate(compose(override.split()))
    msg = str(e.value)
    assert msg.startswith(field + "=") and "\n" not in msg


@pytest.mark.parametrize("args,said", [
    (["reward.alpha=abc"], "reward.alpha=abc: Value 'abc' of type 'str' could not be converted to Float"),
    (["trainer.steps=1.5"], "trainer.steps=1.5: Value '1.5' of type 'float' could not be converted to Integer"),
    (["rollout.n="], "rollout.n=: Value '' of type 'str' could not be converted to Integer"),
    (["trainer.stepz=3"], "Could not override 'trainer.stepz': Key 'stepz' not in 'TrainerConfig'"),
    (["+trainer.steps=3"], "Could not append to config. An item is already at 'trainer.steps'"),
    (["eval.benchmarks=[toy_L1"], "eval.benchmarks=[toy_L1 is not an override Hydra can read"),
    (["--multirun", "reward.alpha=0.5,abc"], "reward.alpha=abc: Value 'abc'"),
    (["learner.betas=[0.9,x]"], "learner.betas=[0.9,x]: "),
])
def test_malformed_overrides_are_one_line_naming_the_field(args, said):
    from opd_exp.__main__ import composition_error

    msg = composition_error(args)
    assert msg is not None and said in msg and "\n" not in msg, msg


def test_well_formed_overrides_compose(tmp_path):
    from opd_exp.__main__ import composition_error

    assert composition_error(["--multirun", "+experiment=powerOPD_toy", "reward.alpha=0.1,0.5",
                              "++pair.teacher.chat_template_kwargs.enable_thinking=false",
                              f"hydra.run.dir={tmp_path}", "eval.benchmarks=[toy_L1,toy_L2]"]) is None


def test_cli_type_error_is_one_line():
    p = _cli("train", "reward.alpha=abc")
    assert p.returncode == 2 and p.stderr.strip() == (
        "error: Error merging override reward.alpha=abc: Value 'abc' of type 'str' could not be "
        "converted to Float")


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "opd_exp", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_cli_bad_alpha_exits_nonzero_with_one_line(tmp_path):
    p = _cli("train", "reward.alpha=-1", f"hydra.run.dir={tmp_path}")
    assert p.returncode != 0
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "reward.alpha" in lines[0] and "Traceback" not in p.stderr


def test_cli_missing_model_path_is_one_line(tmp_path, use_tiny_world):
    p = _cli("train", f"pair.student.path={tmp_path}/nothing_here", f"hydra.run.dir={tmp_path}/run",
             "logger.mode=disabled")
    assert p.returncode != 0
    lines = [line for line in p.stderr.splitlines() if line.strip() and "Loading" not in line]
    assert len(lines) == 1 and "pair.student.path" in lines[0], p.stderr


def test_cli_vllm_sleep_mode_without_gpu_is_one_line(tmp_path, use_tiny_world):
    p = _cli("train", "rollout=vllm", "rollout.sleep=true", f"hydra.run.dir={tmp_path}",
             "logger.mode=disabled")
    assert p.returncode == 2
    lines = [line for line in p.stderr.splitlines() if line.strip() and "Loading" not in line]
    assert lines == ["error: rollout.sleep=True is not allowed: false on a machine without CUDA "
                     "(vLLM sleep mode is GPU only)"]


def test_cli_prints_qwen3_config_offline():
    p = _cli("train", "+experiment=powerOPD_qwen3", "--cfg", "job",
             env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr
    assert "Qwen/Qwen3-4B" in p.stdout and "Qwen/Qwen3-1.7B-Base" in p.stdout


def test_vocabulary_mismatch_is_a_clear_error(tiny_world):
    from transformers import AutoTokenizer

    from opd_exp.engines.hf_models import check_same_vocab

    a = AutoTokenizer.from_pretrained(tiny_world / "student")
    b = AutoTokenizer.from_pretrained(tiny_world / "teacher")
    check_same_vocab(a, b)  # the toy pair shares one vocabulary
    b.add_tokens(["<extra_token>"])
    with pytest.raises(ConfigError, match="^pair: student and teacher tokenizers differ"):
        check_same_vocab(a, b)


@pytest.mark.parametrize("pair", ["toy", "toy_qwen3"])
def test_every_opd_arm_of_the_trl_benchmark_composes(pair):
    """scripts/bench_vs_trl.py's opd_exp arms are valid configs on both pairs (a bad override
    would only show after the TRL arm's minutes)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "bench_vs_trl.py"
    spec = importlib.util.spec_from_file_location("bench_vs_trl", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for name, (kind, extra) in bench.ARMS.items():
        if kind != "opd":
            continue
        cfg = compose(bench.opd_overrides(extra, pair))
        assert cfg.pair.student.path == bench.PAIRS[pair][0], name
        assert cfg.rollout.max_new_tokens == bench.MAX_NEW and cfg.data.prompts_per_step * cfg.rollout.n == 64
