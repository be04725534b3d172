"""The guard of every vLLM server `python -m opd_exp serve` starts, and the shared secret both
sides read.

vLLM's own `--api-key` guards only paths under /v1, /v2, /inference and /cohere; the student's
server also runs with VLLM_SERVER_DEV_MODE=1, whose /collective_rpc calls any worker method by name
(opd_exp uses `reload_weights` from a path in the request), /sleep, /wake_up, /reset_prefix_cache…
`ServerGuard`, an ASGI middleware vLLM loads by import path (`--middleware`), stands in front of all
of them, in vLLM's own process:
- with a secret (OPD_EXP_SERVER_TOKEN_FILE names the file): every request but GET /health must
  carry `Authorization: Bearer <secret>`, else 401 — the dev endpoints, /metrics and /v1 alike;
- only the routes a run and its user need answer (`ROUTES`; a student's server also
  /collective_rpc and /reset_prefix_cache); every other — /sleep, /pause, /weight_checker,
  /update_weights, … — 403, with or without a secret;
- POST /collective_rpc calls `reload_weights` only, and only from an existing folder inside the one
  the server was started for (OPD_EXP_SERVER_WEIGHTS_DIR; unset: a teacher's server, no call at
  all), else 403 — so a server on loopback does not load files of another local user's choosing.

The secret lives in a file only the user can read (mode 600): `serve.token_file`, or the file the
environment variable OPD_EXP_SERVER_TOKEN_FILE names. Its path goes into configs and command
lines; the secret itself into none of them, nor into any file opd_exp writes. Stdlib only: this
module is imported inside vLLM's API server.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import stat
from pathlib import Path

TOKEN_FILE_ENV = "OPD_EXP_SERVER_TOKEN_FILE"  # names the file holding the shared secret
WEIGHTS_DIR_ENV = "OPD_EXP_SERVER_WEIGHTS_DIR"  # the folder a student's server reloads from
OPEN_PATHS = frozenset({"/health"})  # liveness, for the run's and the user's readiness checks
# what the run and a user checking a server by hand call; the student's server adds RELOAD_ROUTES
ROUTES = frozenset({"/health", "/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize",
                    "/detokenize", "/version", "/metrics"})
RELOAD_ROUTES = frozenset({"/collective_rpc", "/reset_prefix_cache"})
RELOAD_KWARGS = frozenset({"weights_path", "is_checkpoint_format"})
MAX_RPC_BODY = 1 << 16  # bytes: a reload request is a few hundred


class TokenError(ValueError):
    """The secret's file is missing, empty, too short or readable by others (one line)."""


def token_file(configured: str = "") -> str:
    """The path of the secret's file: `serve.token_file`, else $OPD_EXP_SERVER_TOKEN_FILE, else ""."""
    return configured or os.environ.get(TOKEN_FILE_ENV, "")


def read_token(path: str, field: str = "serve.token_file") -> str | None:
    """The shared secret in the file at `path` ("" = none: None). Refused when the file is not
    there, holds fewer than 16 characters, or can be read by its group or others."""
    if not path:
        return None
    p = Path(path).expanduser()
    try:
        mode, text = p.stat().st_mode, p.read_text()
    except OSError as e:
        raise TokenError(f"{field}: cannot read the secret's file {p} ({e.strerror or e})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TokenError(f"{field}: {p} can be read by others (mode {stat.filemode(mode)}): chmod 600 {p}")
    token = text.strip()
    if len(token) < 16 or not (token.isascii() and token.isprintable()) or " " in token:
        raise TokenError(f"{field}: {p} must hold one secret of 16 printable ASCII characters or more, e.g. "
                         "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    return token


def is_loopback(host: str | None) -> bool:
    """Whether a URL's host is this machine only: localhost or a loopback address (127.0.0.0/8,
    ::1). A name, 0.0.0.0 or :: binds beyond it."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def inside(path: str, folder: str) -> bool:
    """Whether the absolute `path`, links followed, is `folder` or lies under it."""
    try:
        p, root = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    except ValueError:  # a NUL in the path
        return False
    return os.path.isabs(path) and (p == root or root in p.parents)


async def _answer(send, code: int, error: str) -> None:
    body = json.dumps({"error": error}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if code == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def rpc_refusal(body: bytes, weights_dir: str | None) -> str | None:
    """Why a /collective_rpc body is refused, or None: only `reload_weights`, with no positional
    arguments and no keyword but weights_path / is_checkpoint_format, from inside `weights_dir`."""
    if weights_dir is None:
        return "this server reloads no weights"
    try:
        req = json.loads(body)
    except ValueError:
        return "the body is not JSON"
    if not isinstance(req, dict) or req.get("method") != "reload_weights":
        return "only the method reload_weights may be called"
    kwargs = req.get("kwargs") or {}
    if req.get("args") or not isinstance(kwargs, dict) or set(kwargs) - RELOAD_KWARGS:
        return f"reload_weights takes only the keywords {sorted(RELOAD_KWARGS)}"
    path = kwargs.get("weights_path")
    if path is None:
        return None  # vLLM reloads the folder it last loaded: this one or a checked one
    if not isinstance(path, str) or not inside(path, weights_dir):
        return f"weights_path must be an absolute path in {weights_dir}, the folder this server was started for"
    if not os.path.isdir(path):  # vLLM would take it for a hub id and download it
        return f"{path} is no folder on the server's machine: is the run's filesystem the server's?"
    return None


class ServerGuard:
    """The ASGI middleware (see the module doc). Reads its settings from the environment when
    vLLM builds the app; `token` / `weights_dir` given: those instead (tests)."""

    def __init__(self, app, token: str | None = None, weights_dir: str | None = None):
        self.app = app
        self.token = token if token is not None else read_token(os.environ.get(TOKEN_FILE_ENV, ""),
                                                                TOKEN_FILE_ENV)
        self.weights_dir = weights_dir if weights_dir is not None else os.environ.get(WEIGHTS_DIR_ENV)

    def routes(self) -> frozenset[str]:
        return ROUTES | (RELOAD_ROUTES if self.weights_dir is not None else frozenset())

    def authorized(self, scope) -> bool:
        if self.token is None:
            return True
        sent = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, value = sent.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(value.strip(), self.token.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):  # lifespan: startup and shutdown
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        if not (path in OPEN_PATHS and scope.get("method") in ("GET", "HEAD")) and not self.authorized(scope):
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            return await _answer(send, 401, "Unauthorized: this server wants the run's shared secret")
        route = path.rstrip("/") or "/"
        if route not in ROUTES and not (self.weights_dir is not None and route in RELOAD_ROUTES):
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            return await _answer(send, 403, f"{route} is not served: opd_exp's guard lets through "
                                            f"only {', '.join(sorted(self.routes()))}")
        if route != "/collective_rpc":
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:  # the whole body, to check it and hand it on
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_RPC_BODY:
                return await _answer(send, 413, "request too large")
        refusal = rpc_refusal(body, self.weights_dir)
        if refusal:
            return await _answer(send, 403, f"collective_rpc refused: {refusal}")
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await self.app(scope, replay, send)
