"""Atomic checkpoints: `<run>/checkpoints/step_000050/` written as `.tmp` then renamed.

A checkpoint holds the student (`save_pretrained` + tokenizer, loadable as a model path), the
learner state (optimizer, scheduler) and `state.json` (step). `latest` names the newest one and
is replaced atomically after the folder is complete, so a kill at any moment leaves either the
old or the new checkpoint, never half of one. With several ranks, all of them write into the
folder (a ZeRO learner writes one shard per rank; the run dir must be shared between nodes) and
rank 0 alone prepares, renames and prunes, between barriers.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from opd_exp.config import ConfigError
from opd_exp.core.ranks import Dist


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def latest(run_dir: Path) -> Path | None:
    pointer = checkpoint_root(run_dir) / "latest"
    if not pointer.exists():
        return None
    path = checkpoint_root(run_dir) / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def save(run_dir: Path, step: int, write: Callable[[Path], None], keep_last: int,
         dist: Dist = Dist(), meta: dict | None = None) -> Path:
    """`write(dir)` fills a fresh folder (on every rank); it becomes `step_XXXXXX` only once
    complete."""
    root = checkpoint_root(run_dir)
    name = f"step_{step:06d}"
    final, tmp = root / name, root / f"{name}.tmp"
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    write(tmp)
    dist.barrier()
    if dist.is_main:
        _publish(root, tmp, final, {"step": step, **(meta or {})}, keep_last)
    dist.barrier()
    return final


def _publish(root: Path, tmp: Path, final: Path, state: dict, keep_last: int) -> None:
    name = final.name
    (tmp / "state.json").write_text(json.dumps(state) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer_tmp = root / "latest.tmp"
    pointer_tmp.write_text(name + "\n")
    os.replace(pointer_tmp, root / "latest")
    # keep `keep_last` in all, the one just written among them; never touch a later-numbered one
    older = sorted(p for p in root.glob("step_*")
                   if p.is_dir() and p.suffix != ".tmp" and p.name < final.name)
    for old in older[:max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(old)


CACHES = ("cold_start_traces.jsonl", "prompt_scores.jsonl")  # made for one run, by its config


def holds_run(run_dir: Path) -> bool:
    """True if a run has written its records here (Hydra's own .hydra/ does not count)."""
    return (run_dir / "metrics.jsonl").exists() or checkpoint_root(run_dir).exists()


def clear(run_dir: Path) -> None:
    """trainer.overwrite: delete the records of the run that was here (its checkpoints, metrics,
    plots, caches — teacher traces, prompt scores —, diagnostics under diag/ and W&B run id: a
    new W&B run starts; offline W&B files under wandb/ stay)."""
    shutil.rmtree(checkpoint_root(run_dir), ignore_errors=True)
    shutil.rmtree(run_dir / "diag", ignore_errors=True)
    names = ("metrics.jsonl", "final_metrics.json", "wandb_run_id", *CACHES)
    for path in [run_dir / n for n in names] + list(run_dir.glob("*.png")) + [
            p for n in CACHES for p in run_dir.glob(f"rank*/{n}")]:
        path.unlink(missing_ok=True)


def load_step(path: Path) -> int:
    return json.loads((path / "state.json").read_text())["step"]


# what changes the maths of a run: a resume with other values is refused unless allowed
MATH_KEYS = ("pair", "xtok", "objective", "reward", "learner", "data", "schedule", "prompts",
             "trainer.seed", "rollout.n",
             "rollout.temperature", "rollout.top_p", "rollout.top_k", "rollout.max_new_tokens",
             "rollout.is_cap", "rollout.max_staleness")  # which weights sample a step's rollouts


# memory and speed, not maths (packing: the same loss and gradients, tests/test_packing.py)
NOT_MATH = ("learner.micro_batch_size", "learner.offload_optimizer", "learner.packing")


def _flat(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        return {k: v for key, sub in node.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def check_same_maths(path: Path, config: dict) -> None:
    """`config` (resolved, plain) must match the one `path` was trained with on MATH_KEYS; else
    one line naming the keys (trainer.allow_config_change skips this check)."""
    import yaml

    saved_file = path / "config.yaml"
    if not saved_file.is_file():
        return
    a, b = _flat(yaml.safe_load(saved_file.read_text())), _flat(config)
    keys = sorted(k for k in set(a) & set(b) if a[k] != b[k] and k not in NOT_MATH  # a key
                  and any(k == m or k.startswith(m + ".") for m in MATH_KEYS))  # added later: skip
    if keys:
        said = ", ".join(f"{k} ({a.get(k)!r} → {b.get(k)!r})" for k in keys[:6])
        raise ConfigError(f"trainer.resume=True is not allowed: {path.name} was trained with other "
                          f"values of {said}{' …' if len(keys) > 6 else ''}; "
                          "trainer.allow_config_change=true resumes anyway")


def check_resumable(path: Path, meta: dict) -> None:
    """The run that wrote `path` must match this one in what its learner state depends on
    (`meta`: learner backend, number of ranks); else one line saying what differs."""
    saved = json.loads((path / "state.json").read_text())
    diff = {k: (saved[k], v) for k, v in meta.items() if k in saved and saved[k] != v}
    if diff:
        said = ", ".join(f"{k} {a} (this run: {b})" for k, (a, b) in diff.items())
        raise ConfigError(f"trainer.resume=True is not allowed: {path.name} was written with {said}")
