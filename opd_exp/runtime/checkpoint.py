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
    for old in sorted(p for p in root.glob("step_*") if p.is_dir() and p.suffix != ".tmp")[:-keep_last]:
        shutil.rmtree(old)


def load_step(path: Path) -> int:
    return json.loads((path / "state.json").read_text())["step"]


def check_resumable(path: Path, meta: dict) -> None:
    """The run that wrote `path` must match this one in what its learner state depends on
    (`meta`: learner backend, number of ranks); else one line saying what differs."""
    saved = json.loads((path / "state.json").read_text())
    diff = {k: (saved[k], v) for k, v in meta.items() if k in saved and saved[k] != v}
    if diff:
        said = ", ".join(f"{k} {a} (this run: {b})" for k, (a, b) in diff.items())
        raise ConfigError(f"trainer.resume=True is not allowed: {path.name} was written with {said}")
