"""The layers of docs/architecture.md hold: import-linter's contracts (pyproject.toml), no import
cycle (function-local imports included), engine libraries imported only by their wrappers, small
modules, and objectives that never reach into a model."""

import subprocess
import sys
from pathlib import Path

import grimp
import pytest

from opd_exp.config import registry, schema_cfg

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "opd_exp"
# the only modules that may import these libraries (directly; others reach them by name)
WRAPPERS = {
    "vllm": {"opd_exp.engines.rollout_vllm", "opd_exp.engines.teacher_vllm"},
    "deepspeed": {"opd_exp.engines.learner_deepspeed"},
    "wandb": {"opd_exp.runtime.loggers"},
}


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("opd_exp", include_external_packages=True)


def test_import_linter_contracts_are_kept():
    p = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                        "lint_imports_command()"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert "2 kept, 0 broken" in p.stdout


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), or a self-import."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges[v]:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_function_local_imports_included(graph):
    ours = {m for m in graph.modules if m == "opd_exp" or m.startswith("opd_exp.")}
    edges = {m: {w for w in graph.find_modules_directly_imported_by(m) if w in ours} for m in ours}
    assert sys.getrecursionlimit() > len(ours)
    assert _cycles(edges) == []


def test_engine_libraries_are_imported_only_by_their_wrappers(graph):
    for lib, allowed in WRAPPERS.items():
        importers = {m for m in graph.find_modules_that_directly_import(lib)
                     if m.startswith("opd_exp")}
        assert importers == allowed, (lib, importers)


def test_modules_are_small_and_the_loop_is_one_screen():
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines())
             for p in PACKAGE.rglob("*.py")}
    assert {f: n for f, n in sizes.items() if n > 400} == {}
    assert sizes["opd_exp/train.py"] <= 150
    assert "run_step(" in (PACKAGE / "train.py").read_text()


def test_objectives_never_reach_into_a_model():
    """The maths gets hidden states, log-probs and the LM head through a PolicyView."""
    for p in (PACKAGE / "methods").rglob("*.py"):
        text = p.read_text()
        for internal in ("base_model", "get_output_embeddings", "logits_to_keep"):
            assert internal not in text, (p.name, internal)


def test_registry_names_match_the_implementations():
    from opd_exp.methods import make_objective
    from opd_exp.methods.rewards import TOKEN_REWARDS

    assert set(registry.REWARDS) == set(TOKEN_REWARDS) | {"verifiable", "mix"}
    for name in registry.OBJECTIVES:
        for support in ("teacher", "student", "intersection", "union"):
            cfg = schema_cfg({"objective": {"name": name, "support": support}})
            obj = make_objective(cfg.objective, cfg.reward, cfg.rollout.temperature)
            assert obj.teacher_needs == registry.teacher_needs(cfg.objective), (name, support)
    for table in (registry.ROLLOUTS, registry.TEACHERS, registry.LEARNERS):
        for spec in table.values():  # every module exists, without importing an engine
            module, attr = spec.split(":")
            path = PACKAGE.parent / (module.replace(".", "/") + ".py")
            assert f"def {attr}(" in path.read_text(), spec

