"""The install, as a new user (and a GPU node) meets it.

- Every third-party module that `opd_exp/`, `tests/` or `scripts/` imports belongs to a
  distribution that pyproject.toml declares (base or an extra): an environment that merely
  happens to hold a package (scipy, numpy, pyyaml …) proves nothing about a fresh one.
- The GPU install (`.[vllm-gpu,deepspeed]`) resolves for Linux x86_64 with CUDA, checked with
  uv's resolver for that platform without installing anything (metadata only); and the same
  resolver refuses the pins that made it unresolvable (torch 2.13.0 beside vllm 0.33.0), so the
  check can fail.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOCAL = {"opd_exp", "tests"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    """Distribution names pyproject.toml declares, base and every extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return {norm(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", r).group(0)) for r in reqs}


def imported_modules(*folders: str) -> dict[str, str]:
    """Top-level module → first file that imports it (absolute imports only)."""
    found: dict[str, str] = {}
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for n in names:
                    found.setdefault(n.split(".")[0], str(path.relative_to(ROOT)))
    return found


def undeclared(modules: dict[str, str], dists: set[str]) -> list[str]:
    providers = md.packages_distributions()
    bad = []
    for mod, where in sorted(modules.items()):
        if mod in sys.stdlib_module_names or mod in LOCAL:
            continue
        owners = {norm(d) for d in providers.get(mod, [])}
        if not owners:
            bad.append(f"{mod} (imported by {where}) is installed by no distribution here")
        elif not owners & dists:
            bad.append(f"{mod} (imported by {where}) comes from {sorted(owners)}, declared nowhere")
    return bad


def test_every_imported_module_is_declared():
    bad = undeclared(imported_modules("opd_exp", "tests", "scripts"), declared())
    assert not bad, "undeclared imports:\n" + "\n".join(bad)


def test_the_declaration_check_sees_an_undeclared_import():
    """The check fails where it should: scipy imported, scipy not declared."""
    bad = undeclared({"scipy": "tests/x.py", "json": "tests/x.py"}, declared() - {"scipy"})
    assert len(bad) == 1 and bad[0].startswith("scipy (imported by tests/x.py)")


# ---- the GPU extra resolves for Linux x86_64 + CUDA (uv's resolver, metadata only) ----------

PLATFORM = ["--python-platform", "x86_64-manylinux_2_28", "--python-version", "3.11",
            "--no-python-downloads", "--no-header", "--no-annotate"]


def uv() -> str:
    exe = shutil.which("uv") or str(Path(sys.executable).parent / "uv")
    if not Path(exe).exists():
        pytest.fail("uv is not installed: it is in the test extra (pip install -e '.[test]')")
    return exe


def compile_for_gpu(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([uv(), "pip", "compile", *args, *PLATFORM, "-o", str(tmp_path / "lock.txt")],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


def skip_if_offline(p: subprocess.CompletedProcess) -> None:
    text = p.stderr.lower()
    if p.returncode and any(s in text for s in ("failed to fetch", "dns error", "connect error",
                                                "network", "timed out", "connection")):
        pytest.skip("no package index reachable for uv: " + p.stderr.strip().splitlines()[-1][:200])


@pytest.mark.slow
def test_gpu_extra_resolves_for_linux_x86_64_cuda(tmp_path):
    p = compile_for_gpu(["pyproject.toml", "--extra", "vllm-gpu", "--extra", "deepspeed",
                         "--extra", "hub"], tmp_path)
    skip_if_offline(p)
    assert p.returncode == 0, p.stderr[-3000:]
    pins = dict(re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", (tmp_path / "lock.txt").read_text(), re.M))
    pins = {norm(k): v for k, v in pins.items()}
    assert pins["vllm"] == "0.33.0" and pins["torch"].startswith("2.14.0")
    assert pins["deepspeed"] == "0.19.8" and pins["transformers"] == "5.19.0"


@pytest.mark.slow
def test_resolver_refuses_the_old_torch_pin_beside_vllm_gpu(tmp_path):
    """torch==2.13.0 in the base dependencies made the GPU extra unresolvable: the same check
    on those pins fails."""
    req = tmp_path / "old.txt"
    req.write_text("torch==2.13.0\nvllm==0.33.0\n")
    p = compile_for_gpu([str(req)], tmp_path)
    skip_if_offline(p)
    assert p.returncode != 0 and "torch" in p.stderr
