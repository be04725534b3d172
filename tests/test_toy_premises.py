"""The premise checks of docs/results.md are commands that print their numbers: each style's result
digits are found, and each model's reading of both styles is printed (the tiny world)."""

import importlib.util
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from opd_exp.toyworld import task

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("toy_premises", ROOT / "scripts" / "toy_premises.py")
toy_premises = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy_premises)


@pytest.mark.parametrize("style", task.STYLES)
def test_every_style_has_its_result_digits_found(style):
    """The digits a premise reads: every step's result and the boxed answer, nothing else."""
    p = task.make_problem(random.Random(3), 3)
    text = p.render(style)
    found = [m.group(1) for pat in (toy_premises.RESULT[style], toy_premises.BOXED)
             for m in re.finditer(pat, text)]
    running = re.findall(r"=(\d+)\.", p.thought)
    assert found == running + [p.answer]


@pytest.mark.slow
@pytest.mark.parametrize("student,teacher,styles", [
    ("toy:student", "toy:teacher_readable", ("chat", "readable")),
    ("toy:base_student_near", "toy:teacher_seen_base", ("base_near", "chat")),
])
def test_the_premise_command_prints_both_readings(use_tiny_world, student, teacher, styles):
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "toy_premises.py"), "--student", student,
         "--teacher", teacher, "--student-style", styles[0], "--teacher-style", styles[1],
         "--problems", "4"], capture_output=True, text=True, check=True).stdout
    rows = re.findall(r"^\| (student|teacher) \S+ \| (\w+)(?: \(own\))? \| ([\d.]+) \| ([\d.]+) \|$",
                      out, re.M)
    assert {(r[0], r[1]) for r in rows} == {(m, s) for m in ("student", "teacher") for s in styles}
    assert all(float(r[2]) > 0 for r in rows)
    assert re.search(r"^\| 0–0 \| -?[\d.]+ \| -?[\d.]+ \|$", out, re.M)  # the log-ratio by position
