"""vLLM server rollout backend (`rollout=vllm_server`): sampling from a separately started vLLM
OpenAI-compatible server (other GPUs, another machine) instead of an engine in this process.

Start the server with `python -m opd_exp serve [the run's overrides]` (opd_exp/commands/__init__.py):
it writes an untied copy of `pair.student` (see `save_untied`) into `<serve run>/server_weights/`
and runs vLLM's OpenAI server on that folder with `VLLM_SERVER_DEV_MODE=1`, on the host and port of
`rollout.server_url`, behind opd_exp's guard (opd_exp/engines/server_guard.py). The run then:
- samples with POST /v1/completions (prompts as token ids, `n`, temperature / top-p / top-k,
  `stop_token_ids`, `return_token_ids`, `logprobs=0` for the sampled tokens' log-probs at T = 1);
- pushes the learner's weights every `rollout.sync_every` steps (and once at start, so a resumed
  run samples from its checkpoint) into a new folder `push-<id>` inside the one the server was
  started on (its model's `root` in /v1/models, marked by `serve` with SERVED_MARK; the guard lets
  it reload from inside it only — the run must be able to write it), then POST /collective_rpc
  `reload_weights` and POST /reset_prefix_cache; the previous push is removed.
Every request carries the shared secret of `serve.token_file` when one is set.
One training process per server (the launcher's ranks would push over each other).
"""

from __future__ import annotations

import http.client
import json
import shutil
import time
import uuid
import urllib.error
import urllib.request
from pathlib import Path

import torch

from opd_exp.config.errors import ConfigError, RunStopped
from opd_exp.core.protocols import RolloutBackend
from opd_exp.core.types import Rollouts, Sampling, rollouts_from_samples
from opd_exp.engines.rollout_vllm import save_untied
from opd_exp.engines.server_guard import TOKEN_FILE_ENV, TokenError, read_token, token_file


SERVED_MARK = "opd_exp_server.json"  # written by `serve` into the folder it serves (the student's)


class BadRequest(RuntimeError):
    """A 4xx answer (but 408 and 429): the request itself is wrong — no retry, no other replica."""


class Refused(BadRequest, RunStopped):
    """401 or 403: the server does not let this run in (no secret, another secret) or refuses the
    call (a reload from outside its folder); the CLI prints it as one line."""


def server_token(cfg) -> str | None:
    """The shared secret the run sends to its servers (`serve.token_file` or the file
    $OPD_EXP_SERVER_TOKEN_FILE names); None when neither is set."""
    try:
        return read_token(token_file(cfg.serve.token_file),
                          "serve.token_file" if cfg.serve.token_file else TOKEN_FILE_ENV)
    except TokenError as e:
        raise ConfigError(str(e)) from None


RETRIED = {408, 429}  # a timeout or "too many requests" from the server or a gateway: try again
# the servers are the job's own machines: never reached through an http(s)_proxy of the environment
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def check_access(cfg) -> None:
    """Every server the run calls (rollout.server_url, teacher.server_urls) lets it in: a refusal
    stops a launched run in one line here, before its ranks start (each would print its own, under
    torchrun's traceback). A server not reachable yet is left to the ranks' retries."""
    urls = [cfg.rollout.server_url] if cfg.rollout.backend == "vllm_server" else []
    urls += list(cfg.teacher.server_urls) if cfg.teacher.backend == "vllm_server" else []
    token = server_token(cfg) if urls else None
    for url in urls:
        try:
            request_json(url.rstrip("/"), "/v1/models", None, 60.0, 0, token=token)
        except Refused:
            raise
        except RuntimeError:
            pass


def request_json(url: str, path: str, body: dict | None = None, timeout_s: float = 3600.0,
                 retries: int = 0, backoff_s: float = 1.0, token: str | None = None) -> dict:
    """GET (no body) or POST JSON to a vLLM server, with `token` as `Authorization: Bearer`; the
    decoded answer. Connection errors, timeouts, cut-off answers, 5xx, 408 and 429 answers are
    retried `retries` times (backoff doubling), then raised as RuntimeError; 401 / 403 raise
    Refused, another 4xx answer — a bad request — BadRequest, at once with the server's message."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    for attempt in range(retries + 1):
        req = urllib.request.Request(url + path, data=data, headers=headers)
        try:
            with _OPENER.open(req, timeout=timeout_s) as resp:
                text = resp.read().decode()
            return json.loads(text) if text.strip() else {}
        except urllib.error.HTTPError as e:
            said = " ".join(e.read().decode(errors="replace").split())[:300]
            message = f"{url}{path}: HTTP {e.code}: {said}"
            if e.code == 401:
                raise Refused(f"{url}{path}: HTTP 401: the server wants the shared secret it was started with"
                              f" — {'this run sent another' if token else 'this run sent none'}; set "
                              f"serve.token_file (or {TOKEN_FILE_ENV}) to that file") from None
            if e.code == 403:
                raise Refused(message) from None
            if e.code < 500 and e.code not in RETRIED:
                raise BadRequest(message) from e
            if attempt == retries:
                raise RuntimeError(message) from e
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException,
                ValueError) as e:  # ValueError: a cut-off JSON body
            if attempt == retries:
                raise RuntimeError(f"{url}{path}: {e} (after {retries + 1} attempts)") from e
        time.sleep(backoff_s * 2 ** attempt)
    raise AssertionError("unreachable")


class ServerSampler:
    """Sampling from a vLLM OpenAI server (POST /v1/completions), its weights left as they are:
    the teacher server's sampler (teacher eval, cold-start traces) and the base of the student's."""

    def __init__(self, url: str, tokenizer, stop_ids: set[int], rows: int, timeout_s: float = 3600.0,
                 retries: int = 0, token: str | None = None):
        self.url, self.tokenizer, self.stop_ids = url.rstrip("/"), tokenizer, sorted(stop_ids)
        self.timeout, self.retries, self.token = timeout_s, retries, token
        V = len(tokenizer)
        self.allowed = list(range(V)) if rows > V else None  # padded rows: never sampled
        self.served = self._request("/v1/models")["data"][0]
        self.model_name = self.served["id"]

    def _request(self, path: str, body: dict | None = None) -> dict:
        return request_json(self.url, path, body, self.timeout, self.retries, token=self.token)

    def sync_weights(self, model: torch.nn.Module) -> None:
        pass

    def generate(self, prompts: list[list[int]], s: Sampling) -> Rollouts:
        want_logp = s.temperature == 1.0
        out = self._request("/v1/completions", {
            "model": self.model_name, "prompt": prompts, "n": s.n, "max_tokens": s.max_new_tokens,
            "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k if s.top_k > 0 else -1,
            "stop_token_ids": self.stop_ids, "return_token_ids": True, "skip_special_tokens": False,
            "logprobs": 0 if want_logp else None,
            **({"allowed_token_ids": self.allowed} if self.allowed else {})})
        choices = sorted(out["choices"], key=lambda c: c["index"])  # prompt-major, n per prompt
        samples = [[(c["token_ids"], c["logprobs"]["token_logprobs"] if want_logp else None)
                    for c in choices[g * s.n:(g + 1) * s.n]] for g in range(len(prompts))]
        return rollouts_from_samples(prompts, samples, self.tokenizer.pad_token_id, self.stop_ids)


class VLLMServerRollout(ServerSampler):
    """The student's sampler: the server's weights follow the learner's (see the module doc)."""

    def __init__(self, model: torch.nn.Module, url: str, tokenizer, stop_ids: set[int],
                 sync_every: int, timeout_s: float = 3600.0, token: str | None = None):
        super().__init__(url, tokenizer, stop_ids, model.get_output_embeddings().weight.shape[0], timeout_s,
                         token=token)
        root = Path(self.served.get("root") or "")
        if not (root.is_absolute() and (root / SERVED_MARK).is_file()):
            raise ConfigError(f"rollout.server_url: {self.url} serves {str(root) or self.model_name!r}, which "
                              f"holds no {SERVED_MARK} here: not a folder `python -m opd_exp serve` wrote, or "
                              "not visible from this machine (the run pushes its weights into it: a "
                              "filesystem both machines share, at the same path)")
        self.root = root  # the folder the server was started for: it reloads only from inside it
        self.weights_dir: Path | None = None  # the latest push, a folder of its own in `root`
        self.sync_every, self.calls = sync_every, 0
        self._push(model)

    def _push(self, model: torch.nn.Module) -> None:
        """The weights into a new folder `root/push-<id>` (never over the files the server started
        from; a folder the server cannot see is refused by its guard, never reloaded stale), the
        reload from it, then the previous push removed."""
        new = self.root / f"push-{uuid.uuid4().hex[:12]}"
        try:
            save_untied(model, new)
        except OSError as e:
            raise RunStopped(f"rollout.server_url: cannot write into the server's weights folder {self.root} "
                             f"({e.strerror or e}): the run pushes into the folder `serve` started the "
                             "server on, on a filesystem both machines share, at the same path") from None
        try:
            self._request("/collective_rpc", {"method": "reload_weights", "kwargs": {
                "weights_path": str(new), "is_checkpoint_format": True}})
        except BaseException:
            shutil.rmtree(new, ignore_errors=True)
            raise
        self._request("/reset_prefix_cache", {})  # cached prompt KV used the old weights
        if self.weights_dir is not None:
            shutil.rmtree(self.weights_dir, ignore_errors=True)
        self.weights_dir = new

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.calls += 1
        if self.calls % self.sync_every == 0:
            self._push(model)

def serve_command(url: str, model_dir: Path | str, dtype: str, seed: int, gpu_memory_utilization: float,
                  max_model_len: int = 0, max_logprobs: int = 0, source: dict | None = None,
                  tensor_parallel_size: int = 1) -> list[str]:
    """vLLM's OpenAI-compatible server (`vllm serve`, run as its module: the CPU build's `vllm`
    script looks for a package named vllm) on `model_dir`, at `url`, behind opd_exp's guard
    (server_guard.py; its settings come in the environment, never a secret on the command line);
    `max_logprobs`: the most log-probs per position a request may ask (a teacher's top-K), 0 =
    vLLM's default; `source`: `hub_source(...)`'s revision and remote-code keywords, as flags."""
    import sys
    from urllib.parse import urlparse

    u = urlparse(url)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--host", u.hostname or "127.0.0.1", "--port", str(u.port or 8000), "--dtype", dtype,
           "--generation-config", "vllm", "--seed", str(seed),
           "--gpu-memory-utilization", str(gpu_memory_utilization),
           "--middleware", "opd_exp.engines.server_guard.ServerGuard"]
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    if tensor_parallel_size > 1:
        cmd += ["--tensor-parallel-size", str(tensor_parallel_size)]
    if max_logprobs:
        cmd += ["--max-logprobs", str(max_logprobs)]
    for key, value in (source or {}).items():
        flag = "--" + key.replace("_", "-")
        cmd += [flag] if value is True else [flag, str(value)]
    if not torch.cuda.is_available():
        cmd += ["--enforce-eager"]
    return cmd


def make(cfg, model, tokenizer, stop_ids, work_dir, rank: int = 0) -> RolloutBackend:
    return VLLMServerRollout(model, cfg.rollout.server_url, tokenizer, stop_ids, cfg.rollout.sync_every,
                             token=server_token(cfg))
