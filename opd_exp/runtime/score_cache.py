"""A content-addressed cache of teacher scores (`teacher.cache_dir`), shared by the runs of a sweep.

A teacher's scores of a sequence are a function of the teacher and the tokens alone — not of the
student that sampled them — so they are stored under a key made of: the teacher's identity (its
path, revision, dtype, backend, the vocabulary sizes and, for a local folder, the size and time
of its weight files; for a hub id, the commit the local HF cache resolves it to),
what was asked (sampled / top-K and K) and the row's token ids (the prompt as the teacher reads
it, i.e. after its template, and the response up to its last trained position, with the mask).
A run that scores the same sequences again — another run of the sweep choosing its prompts from
the same starting student and seed, a re-run — reads them back; any change of teacher, template,
tokens or request is another key, so a stale score can never be read. Used where the loop scores
sequences that do not depend on training (prompt selection before training); never for the
rollouts of a student that trains (they are new every step: all misses, only cost).

One file per sequence under `<cache_dir>/<key[:2]>/<key>.pt`, written atomically. Scores that
carry the teacher's hidden states (vocabulary-wide objectives) are not cached.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import fields
from pathlib import Path

import torch

from opd_exp.core.protocols import Teacher
from opd_exp.core.types import Rollouts, TeacherScores


def teacher_identity(model_cfg, backend: str, local_dir: str | None, vocab_size: int | None = None,
                     rows: int | None = None) -> dict:
    """What makes two teachers' scores the same: config, the weight files of a local folder or the
    commit of a hub model in the local HF cache (a hub id with no revision names whatever is
    newest), and the vocabulary: the student tokenizer's `vocab_size` real ids of the teacher's
    `rows` (padded ids are left out of a top-K, and the HF teacher normalises over the real ones)."""
    files, commit = {}, None
    if local_dir and Path(local_dir).is_dir():
        for p in sorted(Path(local_dir).glob("*.safetensors")) + sorted(Path(local_dir).glob("*.bin")):
            st = p.stat()
            files[p.name] = [st.st_size, st.st_mtime_ns]
    elif local_dir:
        commit = hub_commit(local_dir, model_cfg.revision)
    return {"path": model_cfg.path, "revision": model_cfg.revision, "dtype": model_cfg.dtype,
            "backend": backend, "files": files, "commit": commit, "vocab_size": vocab_size, "rows": rows}


def hub_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit a hub model's revision resolves to in the local HF cache (its snapshot
    folder's name), None when it is not there. With teacher=vllm_server this is the trainer's
    cache (its config.json), not necessarily the servers' weights: pin pair.teacher.revision."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except ValueError:  # not a hub id
        return None
    return Path(found).parent.name if isinstance(found, str) else None


class CachedTeacher:
    """A Teacher whose `score` reads the rows it has seen from the cache and asks the teacher only
    for the others; `hits` and `misses` count rows."""

    def __init__(self, teacher: Teacher, cache_dir: Path | str, identity: dict):
        self.teacher, self.root = teacher, Path(cache_dir)
        self.identity = json.dumps(identity, sort_keys=True)
        self.hits = self.misses = 0

    def _keys(self, r: Rollouts, needs: str, k: int) -> tuple[list[str], list[int]]:
        T = r.response_ids_B_T.shape[1]
        lengths = (r.response_mask_B_T.bool() * torch.arange(1, T + 1)).max(-1).values.tolist()
        keys = []
        for b, n in enumerate(lengths):
            row = {"teacher": self.identity, "needs": needs, "k": k,
                   "prompt": r.prompt_ids_B_P[b][r.prompt_mask_B_P[b].bool()].tolist(),
                   "response": r.response_ids_B_T[b, :n].tolist(),
                   "mask": r.response_mask_B_T[b, :n].tolist()}
            keys.append(hashlib.sha256(json.dumps(row).encode()).hexdigest())
        return keys, lengths

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.pt"

    @torch.no_grad()
    def score(self, rollouts: Rollouts, needs: str, k: int = 0) -> TeacherScores:
        if needs not in ("sampled", "topk"):
            return self.teacher.score(rollouts, needs, k)
        device, r = rollouts.response_ids_B_T.device, rollouts.to("cpu")
        keys, lengths = self._keys(r, needs, k)
        cached = {b: torch.load(self._path(key)) for b, key in enumerate(keys) if self._path(key).exists()}
        missing = [b for b in range(len(keys)) if b not in cached]
        self.hits, self.misses = self.hits + len(cached), self.misses + len(missing)
        fresh = self.teacher.score(rollouts.select(torch.tensor(missing, device=device)), needs, k) \
            if missing else None
        out: dict[str, torch.Tensor] = {}
        names = [f.name for f in fields(TeacherScores) if f.name not in ("hidden_B_T_H", "lm_head")]
        B, T = r.response_ids_B_T.shape
        for i, b in enumerate(missing):  # store each new row up to its scored length
            row = {n: getattr(fresh, n)[i, :lengths[b]].cpu() for n in names if torch.is_tensor(getattr(fresh, n))}
            path = self._path(keys[b])
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(row, tmp)
            os.replace(tmp, path)
            cached[b] = row
        for b, row in cached.items():
            for n, v in row.items():
                if n not in out:
                    out[n] = torch.zeros((B, T, *v.shape[1:]), dtype=v.dtype)
                out[n][b, :v.shape[0]] = v
        return TeacherScores(**{n: v.to(device) for n, v in out.items()})
