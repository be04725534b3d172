"""The servers' guard (opd_exp/engines/server_guard.py) as an ASGI app in front of a recording
app, the secret's file, and `serve`'s refusals. The guard in front of real vLLM servers:
tests/test_vllm_server.py."""

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from opd_exp.engines.server_guard import ServerGuard, TokenError, is_loopback, read_token

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "a-shared-secret-0123456789"


class App:
    """The guarded app: records what reaches it (path and body) and answers 200."""

    def __init__(self):
        self.seen = []

    async def __call__(self, scope, receive, send):
        body = b""
        if scope["type"] == "http":
            more = True
            while more:
                m = await receive()
                body, more = body + m.get("body", b""), m.get("more_body", False)
        self.seen.append((scope["path"], body))
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})


def call(guard, path: str, body: dict | bytes | None = None, token: str | None = None,
         method: str = "POST", kind: str = "http", chunks: int = 1) -> tuple[int | None, dict]:
    """(status or the websocket close code, answer) of one request through `guard`."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else b""
    parts = [data[i * len(data) // chunks:(i + 1) * len(data) // chunks] for i in range(chunks)]
    messages = [{"type": "http.request", "body": p, "more_body": i < chunks - 1} for i, p in enumerate(parts)]
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    scope = {"type": kind, "path": path, "method": method, "headers": headers, "root_path": ""}
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(m):
        sent.append(m)

    asyncio.run(guard(scope, receive, send))
    if kind == "websocket":
        return (sent[0]["code"] if sent else None), {}
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


@pytest.fixture
def weights(tmp_path):
    (tmp_path / "server_weights").mkdir()
    (tmp_path / "elsewhere").mkdir()
    return tmp_path / "server_weights"


def reload(path) -> dict:
    return {"method": "reload_weights", "kwargs": {"weights_path": str(path), "is_checkpoint_format": True}}


def test_with_a_secret_every_path_but_health_wants_it(weights):
    app = App()
    guard = ServerGuard(app, token=TOKEN, weights_dir=str(weights))
    for path in ("/v1/completions", "/v1/models", "/collective_rpc", "/sleep", "/wake_up",
                 "/reset_prefix_cache", "/metrics", "/server_info", "/ping", "/v2/x", "/health/"):
        for token in (None, "wrong-secret-0123456789", TOKEN[:-1]):
            assert call(guard, path, reload(weights), token=token)[0] == 401, (path, token)
    assert call(guard, "/health", method="GET")[0] == 200
    assert call(guard, "/health", method="POST")[0] == 401  # only a read is open
    assert call(guard, "/v1/realtime", kind="websocket")[0] == 1008
    assert app.seen == [("/health", b"")]  # nothing else reached the app
    assert call(guard, "/v1/completions", {"prompt": [1]}, token=TOKEN)[0] == 200
    assert call(guard, "/reset_prefix_cache/", {}, token=TOKEN)[0] == 200
    assert [p for p, _ in app.seen] == ["/health", "/v1/completions", "/reset_prefix_cache/"]


def test_only_the_routes_a_run_needs_are_let_through(weights):
    """vLLM's dev mode also serves /sleep, /pause, /weight_checker (zeroes the weights),
    /update_weights…: refused with the secret too, and on a loopback server without one."""
    for token in (TOKEN, None):
        app = App()
        guard = ServerGuard(app, token=token, weights_dir=str(weights))
        for path in ("/sleep", "/wake_up", "/pause", "/weight_checker", "/update_weights", "/abort_requests",
                     "/release_kv_cache_memory", "/start_profile", "/scale_elastic_ep", "/server_info",
                     "/is_sleeping", "/", "/docs", "/openapi.json", "/v1/collective_rpc", "/collective_rpc2"):
            status, answer = call(guard, path, {}, token=token)
            assert status == 403 and answer["error"].startswith(f"{path.rstrip('/') or '/'} is not served"), path
        assert call(guard, "/v1/realtime", kind="websocket", token=token)[0] == 1008
        assert app.seen == []
        for path in ("/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize", "/metrics/"):
            assert call(guard, path, {}, token=token)[0] == 200
    teacher = ServerGuard(App(), token=None, weights_dir=None)
    for path in ("/collective_rpc", "/reset_prefix_cache"):
        assert call(teacher, path, {})[0] == 403


def test_collective_rpc_reloads_only_from_the_folder_it_was_started_for(weights, tmp_path, monkeypatch):
    app = App()
    guard = ServerGuard(app, token=None, weights_dir=str(weights))  # loopback: no secret
    (weights / "link").symlink_to(tmp_path / "elsewhere")
    (weights / "sub").mkdir()
    monkeypatch.chdir(tmp_path)  # a relative path is refused even where it would resolve inside
    refused = [reload(tmp_path / "elsewhere"), reload(f"{weights}/../elsewhere"), reload(weights / "link"),
               reload(str(weights) + "-evil"), reload(tmp_path), reload("server_weights/sub"),
               reload(weights / "not-there"), reload(f"{weights}/sub\x00"),
               {"method": "sleep", "kwargs": {}}, {"method": "collective_rpc"}, {"kwargs": {}},
               {"method": "reload_weights", "args": ["/etc"]},
               {"method": "reload_weights", "kwargs": {"weights_path": str(weights), "weights_iterator": "x"}},
               {"method": "reload_weights", "kwargs": {"weights_path": 3}}, b"not json", [1]]
    for body in refused:
        status, answer = call(guard, "/collective_rpc", body)
        assert status == 403 and answer["error"].startswith("collective_rpc refused: "), body
    assert app.seen == []
    body = reload(weights)
    assert call(guard, "/collective_rpc", body, chunks=3)[0] == 200
    assert call(guard, "/collective_rpc", reload(weights / "sub"))[0] == 200
    assert call(guard, "/collective_rpc", {"method": "reload_weights"})[0] == 200  # its own folder
    assert app.seen[0] == ("/collective_rpc", json.dumps(body).encode())  # the body handed on whole
    assert call(guard, "/collective_rpc", b"x" * (1 << 17), chunks=4)[0] == 413


def test_the_guard_reads_its_settings_from_the_environment(weights, tmp_path, monkeypatch):
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")
    secret.chmod(0o600)
    monkeypatch.setenv("OPD_EXP_SERVER_TOKEN_FILE", str(secret))
    monkeypatch.setenv("OPD_EXP_SERVER_WEIGHTS_DIR", str(weights))
    guard = ServerGuard(App())
    assert guard.token == TOKEN and guard.weights_dir == str(weights)
    assert call(guard, "/v1/models", method="GET")[0] == 401
    assert call(guard, "/collective_rpc", reload(weights), token=TOKEN)[0] == 200
    secret.write_text("short")
    with pytest.raises(TokenError):  # a server whose secret cannot be read does not start
        ServerGuard(App())


def test_the_secret_file_must_be_private_and_long(tmp_path):
    f = tmp_path / "token"
    assert read_token("") is None
    with pytest.raises(TokenError, match="^serve.token_file: cannot read the secret's file"):
        read_token(str(f))
    f.write_text(TOKEN)
    f.chmod(0o644)
    with pytest.raises(TokenError, match=r"can be read by others \(mode -rw-r--r--\): chmod 600"):
        read_token(str(f))
    f.chmod(0o600)
    assert read_token(str(f)) == TOKEN
    for bad in ("", "short", "two words but long enough", "ünïcödé-sécret-0123456789"):
        f.write_text(bad)
        with pytest.raises(TokenError, match="one secret of 16 printable ASCII characters or more"):
            read_token(str(f))


def test_which_hosts_are_loopback():
    assert all(map(is_loopback, ["127.0.0.1", "127.0.1.1", "localhost", "LOCALHOST", "::1", "[::1]"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "", None, "10.0.0.5", "node-a", "sampler-host"]))


def test_serve_beyond_loopback_without_a_secret_is_refused_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OPD_EXP_SERVER_TOKEN_FILE"}
    p = subprocess.run([sys.executable, "-m", "opd_exp", "serve", "rollout=vllm_server",
                        "serve.url=http://0.0.0.0:8123", f"hydra.run.dir={tmp_path}"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert p.returncode == 2 and p.stderr.strip().startswith("error: serve.url: http://0.0.0.0:8123 "
                                                             "binds beyond this machine")
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "server_weights").exists()


def test_serve_passes_the_secret_in_the_environment_never_on_the_command_line(tmp_path, use_tiny_world):
    from opd_exp.commands import guard_env
    from opd_exp.config import ConfigError
    from opd_exp.engines.rollout_vllm_server import serve_command

    from .conftest import compose

    secret = tmp_path / "token"
    secret.write_text(TOKEN)
    secret.chmod(0o600)
    cfg = compose(["rollout=vllm_server", f"serve.token_file={secret}"])
    env = guard_env(cfg, "http://0.0.0.0:8000", tmp_path / "w")
    assert env == {"OPD_EXP_SERVER_WEIGHTS_DIR": str(tmp_path / "w"),
                   "OPD_EXP_SERVER_TOKEN_FILE": str(secret.resolve()), "VLLM_API_KEY": TOKEN}
    assert guard_env(compose(["rollout=vllm_server"]), "http://127.0.0.1:8000", None) == {}
    cmd = serve_command("http://0.0.0.0:8000", tmp_path / "w", "float32", 0, 0.5)
    assert cmd[cmd.index("--middleware") + 1] == "opd_exp.engines.server_guard.ServerGuard"
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and not any(TOKEN in c for c in cmd)
    cmd = serve_command("http://:9000", tmp_path, "float32", 0, 0.5)  # no host named: loopback
    assert cmd[cmd.index("--host"):cmd.index("--host") + 4] == ["--host", "127.0.0.1", "--port", "9000"]
    secret.chmod(0o640)
    with pytest.raises(ConfigError, match="^serve.token_file: .* can be read by others"):
        guard_env(cfg, "http://0.0.0.0:8000", None)
