"""The embedded toy world (SPEC §6): where it lives, and building it on first use.

Lookup order for the world folder:
1. `$OPD_EXP_TOY_DIR` if set (built there on first use if empty);
2. the copy shipped inside the package (`opd_exp/toyworld/artifacts`, built with seed 0);
3. otherwise it is built into `~/.cache/opd_exp/toyworld` on first use.
`python -m opd_exp toy build --out DIR` rebuilds it from a seed; `--only NAME,…` trains the named
condition models (build.VARIANTS) into an existing world.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SHIPPED_DIR = Path(__file__).parent / "artifacts"
CACHE_DIR = Path.home() / ".cache" / "opd_exp" / "toyworld"
ENV_VAR = "OPD_EXP_TOY_DIR"
PAIR = ("teacher", "student")
VARIANT_NAMES = ("teacher_foreign", "teacher_same_data", "base_student", "teacher_short",
                 "teacher_long", "teacher_readable", "base_student_near",
                 "teacher_seen_base")  # = build.VARIANTS
# toy models on the real Qwen vocabularies (= qwen_models.NAMES): small in the world, lifted to
# their real embedding rows in the cache on first use
REAL_VOCAB_NAMES = ("qwen3_teacher", "qwen3_student", "qwen25_teacher", "qwen25_student",
                    "qwen36_teacher")
MODEL_NAMES = PAIR + VARIANT_NAMES + REAL_VOCAB_NAMES


def is_built(path: Path) -> bool:
    return (path / "manifest.json").is_file()


def world_dir(build_if_missing: bool = True) -> Path:
    """The toy world folder, built (≈ 2 h on 2 cores: the pair and the condition models, not the
    real-vocabulary families) if
    no built copy is found."""
    if os.environ.get(ENV_VAR):
        candidates, target = [Path(os.environ[ENV_VAR])], Path(os.environ[ENV_VAR])
    else:
        candidates, target = [SHIPPED_DIR, CACHE_DIR], CACHE_DIR
    for path in candidates:
        if is_built(path):
            return path
    if not build_if_missing:
        raise FileNotFoundError(f"no toy world in {', '.join(map(str, candidates))}")
    from opd_exp.toyworld.build import build_world

    print(f"toy world not found; building it into {target} (one time)")
    return build_world(target)  # the real-vocabulary families: toy build --only qwen3,…


def manifest(path: Path | None = None) -> dict:
    return json.loads(((path or world_dir()) / "manifest.json").read_text())


def model_dir(name: str) -> Path:
    """Folder of toy model `name` (the part after `toy:` in a model path)."""
    if name not in MODEL_NAMES:
        from opd_exp.config import ConfigError

        raise ConfigError(f"toy:{name} is not a toy model: one of " + ", ".join(
            f"toy:{n}" for n in MODEL_NAMES))
    world = world_dir()
    if not (world / name / "config.json").is_file():
        from opd_exp.config import ConfigError

        only = name.rsplit("_", 1)[0] if name in REAL_VOCAB_NAMES else name
        raise ConfigError(f"toy:{name} is not in the toy world at {world} (built before it "
                          f"existed): python -m opd_exp toy build --out {world} --only {only}")
    if name in REAL_VOCAB_NAMES:
        from opd_exp.toyworld.qwen_models import lifted_dir

        return lifted_dir(world / name)
    return world / name


def benchmark_file(name: str) -> Path:
    return world_dir() / "benchmarks" / f"{name}.jsonl"
