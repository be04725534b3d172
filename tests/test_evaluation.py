"""Avg@k / Pass@k against brute force; answer extraction and math-verify checking."""

import itertools
import random

import pytest

from opd_exp.evaluation import is_correct, last_boxed, pass_at_k, score_counts


@pytest.mark.parametrize("n,k", [(8, 8), (8, 1), (10, 3), (16, 8), (5, 5), (6, 2)])
def test_pass_at_k_equals_subset_enumeration(n, k):
    for c in range(n + 1):
        outcomes = [1] * c + [0] * (n - c)
        subsets = list(itertools.combinations(range(n), k))
        brute = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
        assert abs(pass_at_k(n, c, k) - brute) < 1e-12


def test_score_counts_brute_force():
    rng = random.Random(0)
    n = k = 8
    counts = [rng.randint(0, n) for _ in range(50)]
    samples = [[1] * c + [0] * (n - c) for c in counts]
    s = score_counts(counts, n, k)
    assert abs(s["avg@8"] - sum(sum(x) / n for x in samples) / 50) < 1e-12
    assert abs(s["pass@8"] - sum(any(x) for x in samples) / 50) < 1e-12
    accs = [sum(x) / n for x in samples]
    mean = sum(accs) / 50
    se = (sum((a - mean) ** 2 for a in accs) / 49 / 50) ** 0.5
    assert abs(s["avg@8_stderr"] - se) < 1e-12


def test_pass_at_k_rejects_k_above_n():
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 8)


def test_last_boxed():
    assert last_boxed(r"<think>1+1=2.</think> \boxed{2}") == "2"
    assert last_boxed(r"\boxed{1} then \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{unclosed") is None
    assert last_boxed("no answer") is None


@pytest.mark.parametrize("response,answer,ok", [
    (r"\boxed{64}", "64", True),
    (r"\boxed{64.0}", "64", True),
    (r"\boxed{\frac{1}{2}}", "0.5", True),
    (r"\boxed{\dfrac12}", r"\frac{1}{2}", True),
    (r"\boxed{63}", "64", False),
    (r"the answer is 64", "64", False),
    (r"\boxed{64} \boxed{7}", "64", False),  # the last boxed answer counts
])
def test_is_correct_uses_math_verify(response, answer, ok):
    assert is_correct(response, answer) is ok


def test_gap_recovery_at_every_eval_and_after_a_resume(monkeypatch, use_tiny_world):
    """eval/gap_recovery = (Acc_now − Acc_step0) / (Acc_teacher − Acc_step0) (SPEC §3)."""
    from opd_exp.loop import evaluator as ev
    from opd_exp.loop.evaluator import Evaluator

    from .conftest import compose

    acc = iter([0.75, 0.25, 0.35, 0.5])  # teacher, student at 0, at 50, at 100
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: {"avg@8": next(acc)})
    cfg = compose(["eval.benchmarks=[toy_L1]"])
    e = Evaluator(cfg.eval, 0, None, None)
    assert "eval/gap_recovery" not in e(None, 0, prefix="teacher/eval")
    assert e(None, 0)["eval/gap_recovery"] == 0.0
    assert e(None, 50)["eval/gap_recovery"] == pytest.approx(0.2)
    resumed = Evaluator(cfg.eval, 0, None, None)  # a new process: it reads the step-0 records
    resumed.recall([{"step": 0, "teacher/eval/avg@8": 0.75}, {"step": 0, "eval/avg@8": 0.25},
                    {"step": 50, "eval/avg@8": 0.35}])
    assert resumed(None, 100)["eval/gap_recovery"] == pytest.approx(0.5)


def test_integer_answers_get_math_verifys_verdict_without_its_parser(monkeypatch):
    """Two integers (signs, leading zeros, spaces, beyond 64 bits) are compared as integers, and
    that is math-verify's own verdict on every pair; anything else still goes to math-verify."""
    from math_verify import parse, verify

    import opd_exp.evaluation as ev

    xs = ["0", "-0", "+0", "7", "07", " 007", "-7", "+7 ", "70", "-10", "1", "-01",
          "12345678901234567890", "12345678901234567891"]
    expected = {(a, b): verify(parse(f"\\boxed{{{b}}}"), parse(f"\\boxed{{{a}}}")) for a in xs for b in xs}
    calls = []
    monkeypatch.setattr(ev, "_parse", lambda e: calls.append(e) or parse(f"\\boxed{{{e}}}"))
    for (pred, answer), ok in expected.items():
        assert is_correct(f"\\boxed{{{pred}}}", answer) is ok, (pred, answer)
    assert calls == []  # no parser for integer pairs
    long = "9" * 5000  # past int()'s 4300 digits: a degenerate rollout must not crash the step
    assert is_correct(f"\\boxed{{{long}}}", "0" + long) and not is_correct(f"\\boxed{{{long}}}", "-" + long)
    assert is_correct(r"\boxed{7.0}", "7") and calls  # a decimal: math-verify, as before
