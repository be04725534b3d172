"""Off-policy cold start (SPEC §2): teacher-written traces of the training prompts, kept only if
they pass the rejection filter (a prompt is sampled again up to `schedule.max_retries` times),
cached in `<work dir>/cold_start_traces.jsonl` so that a resumed run trains on the same traces.
The student is SFT-ed on them for `schedule.cold_start_steps` steps (opd_exp/loop/step.py).

A prompt whose every attempt was rejected is dropped from its step; if that leaves a step with no
trace at all, the last attempts are trained on (counted in `schedule/kept_rejected`) rather than
skipping the update, so every rank takes every optimizer step.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from opd_exp.core.protocols import RolloutBackend
from opd_exp.core.types import Problem, Rollouts, Sampling, rollouts_from_samples
from opd_exp.recipes.rejection import rejection_reason
from opd_exp.runtime.loggers import read_cache


class TeacherTraces:
    """`__call__(problems) -> (the problems trained on, their traces after the student's prompts,
    metrics)`."""

    def __init__(self, path: Path, made_under: dict, sampler: RolloutBackend, tokenizer, encode,
                 teacher_encode, sampling: Sampling, stop_ids: set[int], schedule_cfg):
        """`encode`: the student's prompt rendering (what it is trained after); `teacher_encode`:
        the teacher's (what it samples after; the same when pair.teacher_prompt=student);
        `made_under`: the settings the cache is stamped with (runtime/loggers.py read_cache)."""
        self.path, self.sampler, self.tokenizer = path, sampler, tokenizer
        path.parent.mkdir(parents=True, exist_ok=True)
        self.encode, self.teacher_encode = encode, teacher_encode
        self.sampling, self.stop_ids, self.cfg = replace(sampling, n=1), sorted(stop_ids), schedule_cfg
        # prompt text → response token ids, or None when every attempt was rejected
        self.cache: dict[str, list[int] | None] = {r["prompt"]: r["response_ids"]
                                                   for r in read_cache(path, made_under)}

    def _remember(self, prompt: str, ids: list[int] | None) -> None:
        self.cache[prompt] = ids
        with open(self.path, "a") as f:
            f.write(json.dumps({"prompt": prompt, "response_ids": ids}) + "\n")

    def _sample(self, problems: list[Problem]) -> list[tuple[list[int], str]]:
        r = self.sampler.generate([self.teacher_encode(p.prompt) for p in problems], self.sampling)
        out = []
        for b in range(r.size):
            ids = r.response_ids_B_T[b][r.response_mask_B_T[b] > 0].tolist()
            out.append((ids, self.tokenizer.decode(ids, skip_special_tokens=True)))
        return out

    def __call__(self, problems: list[Problem]) -> tuple[list[Problem], Rollouts, dict[str, float]]:
        todo = list({p.prompt: p for p in problems if p.prompt not in self.cache}.values())
        rejected, last = 0, {}
        for _ in range(1 + self.cfg.max_retries):
            if not todo:
                break
            again = []
            for p, (ids, text) in zip(todo, self._sample(todo)):
                last[p.prompt] = ids
                if self.cfg.filter and rejection_reason(text) is not None:
                    rejected += 1
                    again.append(p)
                else:
                    self._remember(p.prompt, ids)
            todo = again
        for p in todo:
            self._remember(p.prompt, None)
        kept = [(p, self.cache[p.prompt]) for p in problems if self.cache[p.prompt] is not None]
        dropped, kept_rejected = len(problems) - len(kept), 0
        if not kept:  # nothing usable this step: the last attempts rather than no update
            kept = [(p, last[p.prompt] if p.prompt in last else self._sample([p])[0][0])
                    for p in problems]
            kept_rejected = len(kept)
        r = rollouts_from_samples([self.encode(p.prompt) for p, _ in kept],
                                  [[(ids, None)] for _, ids in kept],
                                  self.tokenizer.pad_token_id, self.stop_ids)
        return [p for p, _ in kept], r, {
            "schedule/traces": float(len(kept)), "schedule/rejected": float(rejected),
            "schedule/dropped": float(dropped), "schedule/kept_rejected": float(kept_rejected)}
