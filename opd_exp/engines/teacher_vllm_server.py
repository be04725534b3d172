"""vLLM teacher server backend (`teacher=vllm_server`): the teacher off the training GPUs.

The teacher runs as vLLM OpenAI-compatible servers started apart from training, on their own
GPUs or nodes (`python -m opd_exp serve serve.role=teacher`, one per replica), and the run scores
its rollouts against them: POST /v1/completions with each row's prompt + response as token ids,
`max_tokens` 1 and vLLM's `prompt_logprobs` — the same request the in-process `teacher=vllm`
engine makes (opd_exp/engines/teacher_vllm.py: `ScoreRequest`), so the same numbers come back:
log q(y_t | y_<t) of the sampled token, or the teacher's top-K at each response position.

A pool: `teacher.server_urls` lists replicas of one teacher; a batch is split into one contiguous
share per replica, sent at once. A request that fails (connection, timeout, 5xx) is retried
`teacher.retries` times, then it goes to the next replica; the step fails with the servers'
messages only when every replica has failed it. A share is sent as requests of at most
`teacher.request_rows` sequences, one after another: vLLM answers a request when all its rows are
scored, so `teacher.timeout_s` bounds one request's compute, not the whole share's. At start, each
replica must serve pair.teacher (by name): a URL of another model fails there, not in the scores.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePath

import torch

from opd_exp.config.errors import ConfigError
from opd_exp.core.protocols import RolloutBackend, Teacher
from opd_exp.core.types import Rollouts, TeacherScores
from opd_exp.engines.hf_models import model_shape, resolve_path
from opd_exp.engines.rollout_vllm_server import BadRequest, ServerSampler, request_json, server_token
from opd_exp.engines.teacher_vllm import ScoreRequest, check_needs


def model_names(path: str | None) -> set[str]:
    """The names a model goes by, lower-case: its folder's or hub id's last part, and for a folder
    of the HF cache (…/models--org--name/snapshots/<commit>) the repository's name."""
    if not path:
        return set()
    parts = PurePath(path).parts
    names = {parts[-1].lower()} if parts else set()
    names |= {x.split("--")[-1].lower() for x in parts if x.startswith("models--")}
    return names


def same_model(expect: str, served_id: str, root: str | None) -> bool:
    """Two absolute paths (the run's folder, the server's): the same path; else by name, as
    folders move between machines and servers rename models."""
    if root and PurePath(expect).is_absolute() and PurePath(root).is_absolute():
        return PurePath(expect) == PurePath(root)
    return bool(model_names(expect) & (model_names(served_id) | model_names(root)))


class VLLMServerTeacher:
    """`expect`: the model the servers must serve (pair.teacher.path as `serve` names it; None: not
    checked); `request_rows`: sequences per request (0: a replica's whole share in one); `token`:
    the servers' shared secret (None: none sent)."""

    def __init__(self, urls: list[str], timeout_s: float, retries: int, vocab_size: int, rows: int,
                 expect: str | None = None, request_rows: int = 0, token: str | None = None):
        self.urls = [u.rstrip("/") for u in urls]
        self.timeout, self.retries, self.request_rows = timeout_s, retries, request_rows
        self.vocab_size, self.padded = vocab_size, max(0, rows - vocab_size)
        self.token = token
        served = [self._request(u, "/v1/models")["data"][0] for u in self.urls]
        self.models = [m["id"] for m in served]
        contexts = [m["max_model_len"] for m in served if m.get("max_model_len")]
        self.max_model_len = min(contexts) if contexts else None  # the servers' own (vLLM's model card)
        for url, m in zip(self.urls, served):  # another model's scores are no error later
            if expect is not None and not same_model(expect, m["id"], m.get("root")):
                raise ConfigError(f"teacher.server_urls: {url} serves {m['id']!r} (from {m.get('root')!r}), "
                                  f"not {expect!r} (pair.teacher.path, or teacher.served_model if the "
                                  "servers name it otherwise)")

    def _request(self, url: str, path: str, body: dict | None = None) -> dict:
        return request_json(url, path, body, self.timeout, self.retries, token=self.token)

    def _positions(self, replica: int, seqs: list[list[int]], starts: list[int], lengths: list[int],
                   logprobs: int) -> tuple[int, list[list[dict[int, tuple[int | None, float]]]]]:
        """(the replica that answered, {token id: (rank, log q)} at each scored response position
        of each sequence): from `replica`, the next ones if it fails or answers short."""
        if not seqs:
            return replica, []
        errors = []
        for r in [*range(replica, len(self.urls)), *range(replica)]:
            try:
                out = self._request(self.urls[r], "/v1/completions", {
                    "model": self.models[r], "prompt": seqs, "max_tokens": 1,
                    "prompt_logprobs": logprobs, "temperature": 1.0})
                choices = sorted(out["choices"], key=lambda c: c["index"])
                if len(choices) != len(seqs) or any(len(c["prompt_logprobs"] or []) < start + n
                                                    for c, start, n in zip(choices, starts, lengths)):
                    raise RuntimeError(f"{self.urls[r]}: an answer with fewer sequences or positions than asked")
                break
            except BadRequest:  # the request is wrong: every replica would refuse it
                raise
            except (RuntimeError, KeyError, TypeError) as e:  # KeyError, TypeError: not vLLM's answer
                errors.append(f"{self.urls[r]}: {e!r}" if not isinstance(e, RuntimeError) else str(e))
        else:
            raise RuntimeError("every teacher server failed: " + " | ".join(errors))
        return r, [[{int(tok): (lp.get("rank"), lp["logprob"]) for tok, lp in pos.items()}
                    for pos in c["prompt_logprobs"][start:start + n]]
                   for c, start, n in zip(choices, starts, lengths)]

    def _share(self, replica: int, seqs, starts, lengths, logprobs: int) -> list:
        """One replica's share, `request_rows` sequences per request, one request after another
        (`teacher.timeout_s` bounds each); after a fall-over the rest of the share goes on from
        the replica that answered, so a hung replica costs its timeouts once a share."""
        step, out = self.request_rows or max(1, len(seqs)), []
        for i in range(0, len(seqs), step):
            replica, part = self._positions(replica, seqs[i:i + step], starts[i:i + step],
                                            lengths[i:i + step], logprobs)
            out += part
        return out

    @torch.no_grad()
    def score(self, rollouts: Rollouts, needs: str, k: int = 0) -> TeacherScores:
        if needs == "none":
            return TeacherScores()
        check_needs(needs, "vllm_server")
        req = ScoreRequest.of(rollouts)
        n = len(self.urls)

        def fetch(rows: list[int], logprobs: int) -> list:
            shares = [rows[len(rows) * i // n:len(rows) * (i + 1) // n] for i in range(n)]  # contiguous
            with ThreadPoolExecutor(max_workers=n) as pool:
                parts = pool.map(lambda i: self._share(
                    i, *([x[j] for j in shares[i]] for x in (req.seqs, req.starts, req.lengths)), logprobs),
                    range(n))
                return [p for part in parts for p in part]
        return req.scores(*req.fetch(fetch, needs, k, self.padded, self.vocab_size), needs, k,
                          self.vocab_size)


def make(cfg, tokenizer, stop_ids, device=None) -> tuple[Teacher, RolloutBackend]:
    """(scorer, sampler) against the servers of teacher.server_urls; the sampler (teacher eval,
    cold-start traces) uses the first replica, with an hour per request and no retry (a whole
    benchmark share is one generation request: never sampled twice)."""
    t = cfg.teacher
    rows, token = model_shape(cfg.pair.teacher, "pair.teacher")[0], server_token(cfg)
    teacher = VLLMServerTeacher(list(t.server_urls), t.timeout_s, t.retries, len(tokenizer), rows,
                                expect=t.served_model or resolve_path(cfg.pair.teacher.path),
                                request_rows=t.request_rows, token=token)
    return teacher, ServerSampler(t.server_urls[0], tokenizer, stop_ids, rows, max(t.timeout_s, 3600.0),
                                  token=token)
