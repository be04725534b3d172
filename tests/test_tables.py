"""`python -m opd_exp tables`: paper-shaped tables from synthetic run directories — the numbers,
the layout, the best marked per column, unfinished runs listed and never averaged in."""

import csv
import json
import subprocess
import sys

from omegaconf import OmegaConf

from opd_exp.analysis.tables import run_tables
from opd_exp.config import schema_cfg

BENCHES = ["toy_L1", "toy_L2"]


def make_run(path, reward: str, alpha: float, seed: int, l1: float, l2: float, finished: bool = True,
             grad_norms=(1.0, 3.0), objective: str = "sampled_token", extra=None):
    """A run dir as `train` leaves it: config.yaml, metrics.jsonl (step-0 eval, two steps, a final
    eval), final_metrics.json when finished. `extra`: more metrics at step 2."""
    cfg = schema_cfg({"reward": {"name": reward, "alpha": alpha}, "trainer": {"seed": seed},
                      "objective": {"name": objective}, "eval": {"benchmarks": BENCHES, "k": 8}})
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    records = [{"step": 0, "eval/toy_L1/avg@8": 0.1, "eval/toy_L1/pass@8": 0.5,
                "eval/toy_L2/avg@8": 0.0, "eval/toy_L2/pass@8": 0.25, "eval/avg@8": 0.05}]
    records += [{"step": s, "train/grad_norm": g, "reward/min": -g, "rollout/response_len": 10.0}
                for s, g in zip((1, 2), grad_norms)]
    records[-1].update(extra or {})
    records.append({"step": 2, "eval/toy_L1/avg@8": l1, "eval/toy_L1/pass@8": min(1.0, 2 * l1),
                    "eval/toy_L2/avg@8": l2, "eval/toy_L2/pass@8": min(1.0, 2 * l2),
                    "eval/avg@8": (l1 + l2) / 2})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if finished:
        (path / "final_metrics.json").write_text("{}")
    (path / ".hydra").mkdir()
    (path / ".hydra" / "config.yaml").write_text("not: a run\n")  # Hydra's copy: not a run


def sweep(tmp_path):
    root = tmp_path / "sweep"
    make_run(root / "0", "log_ratio", 1.0, 0, l1=0.2, l2=0.1)
    make_run(root / "1", "log_ratio", 1.0, 1, l1=0.4, l2=0.1)
    make_run(root / "2", "power", 0.5, 0, l1=0.3, l2=0.3, grad_norms=(0.1, 0.3))
    make_run(root / "3", "power", 0.5, 1, l1=0.5, l2=0.1, grad_norms=(0.1, 0.3))
    make_run(root / "4", "power", 2.0, 0, l1=0.9, l2=0.9, finished=False)  # killed: never averaged
    return root


def test_poweropd_alpha_table_numbers_layout_best_and_unfinished(tmp_path):
    root = sweep(tmp_path)
    text = run_tables(root, "poweropd_alpha")
    lines = text.splitlines()
    assert lines[2] == ("| row | seeds | toy_L1 avg@8 | toy_L1 pass@8 | toy_L2 avg@8 | toy_L2 pass@8 | "
                        "mean avg@8 | mean pass@8 | grad norm (mean) | reward min (mean) | "
                        "reward early min (mean) | baseline ÷ this grad norm |")
    rows = {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| OPD") or
            line.startswith("| PowerOPD")}
    assert set(rows) == {"OPD (log-ratio)", "PowerOPD (α = 0.5)"}  # α = 2 is unfinished
    # log-ratio: toy_L1 0.2, 0.4 → 0.300 ± 0.141; mean avg per run (0.15, 0.25) → 0.200 ± 0.071
    assert rows["OPD (log-ratio)"] == (
        "| OPD (log-ratio) | 2 | 0.300 ± 0.141 | 0.600 ± 0.283 | 0.100 ± 0.000 | 0.200 ± 0.000 | "
        "0.200 ± 0.071 | 0.400 ± 0.141 | 2 ± 0 | -2 ± 0 | – | 1 ± 0 |")
    # power 0.5: toy_L1 0.3, 0.5 → 0.400 (best); toy_L2 0.3, 0.1 → 0.200 (best); means 0.3, 0.3
    assert rows["PowerOPD (α = 0.5)"] == (
        "| PowerOPD (α = 0.5) | 2 | **0.400 ± 0.141** | **0.800 ± 0.283** | **0.200 ± 0.141** | "
        "**0.400 ± 0.283** | **0.300 ± 0.000** | **0.600 ± 0.000** | 0.2 ± 0 | -0.2 ± 0 | "
        "– | 10 ± 0 |")  # the log-ratio runs' mean grad norm 2 ÷ this row's 0.2
    assert "Paper: PowerOPD (SPEC §5)" in text
    assert f"not averaged in): {root / '4'}" in text

    out = root / "tables" / "poweropd_alpha"
    with open(out / "poweropd_alpha.csv") as f:
        got = list(csv.reader(f))
    assert got[0][:4] == ["row", "seeds", "toy_L1 avg@8 mean", "toy_L1 avg@8 std"]
    power = next(r for r in got if r[0].startswith("PowerOPD"))
    assert float(power[2]) == 0.4 and abs(float(power[3]) - 0.1414213562) < 1e-9
    for png in ("grad_norm.png", "avg.png", "response_len.png"):
        assert (out / png).stat().st_size > 0
    assert not (out / "overlap.png").exists()  # no token diagnostics were logged
    runs = json.loads((out / "runs.json").read_text())
    assert runs[str(root / "4")] == {"row": None, "finished": False}


def test_rows_that_share_a_label_are_told_apart_by_their_settings(tmp_path):
    root = sweep(tmp_path)
    cfg = OmegaConf.load(root / "1" / "config.yaml")
    cfg.learner.lr = 1e-3  # same method, another learning rate: its own row
    (root / "1" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    text = run_tables(root, "poweropd_alpha")
    assert "| OPD (log-ratio) [learner.lr=0.0005] | 1 |" in text
    assert "| OPD (log-ratio) [learner.lr=0.001] | 1 |" in text


def test_cli_names_the_allowed_tables_and_refuses_a_sweep_without_finished_runs(tmp_path):
    root = sweep(tmp_path)
    p = subprocess.run([sys.executable, "-m", "opd_exp", "tables", str(root), "--table", "nope"],
                       capture_output=True, text=True)
    assert p.returncode != 0 and "poweropd_alpha" in p.stderr + p.stdout
    empty = tmp_path / "empty"
    make_run(empty / "0", "log_ratio", 1.0, 0, 0.1, 0.1, finished=False)
    p = subprocess.run([sys.executable, "-m", "opd_exp", "tables", str(empty), "--table", "poweropd_alpha"],
                       capture_output=True, text=True)
    assert p.returncode != 0 and "no finished run" in p.stderr + p.stdout


def test_paper_column_before_column_is_never_best_and_diagnostic_plots(tmp_path):
    root = tmp_path / "sweep"
    diag = {"diag/token/mass_teacher": 0.9, "diag/token/ratio": 0.5,
            "diag/token/log_ratio_pos0_0_mean": -5.0, "diag/token/log_ratio_pos1_1_mean": -2.0}
    make_run(root / "0", "log_ratio", 1.0, 0, l1=0.2, l2=0.1, extra=diag)
    make_run(root / "1", "log_clip", 1.0, 0, l1=0.3, l2=0.1, extra=diag)
    make_run(root / "2", "log_ratio", 1.0, 0, l1=0.1, l2=0.1, objective="full_vocab")
    text = run_tables(root, "poweropd_main")
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in text.splitlines() if line.startswith("| ")}
    assert rows["row"][-1] == "paper |" and rows["row"][8] == "avg@k before"
    assert rows["OPD (log-ratio)"][-1] == "vanilla OPD: the baseline |"
    assert rows["OPD + clip"][-1] == "PowerOPD +3.01 / +3.54 over post-hoc |"
    assert rows["full-vocabulary OPD"][-1] == "PowerOPD +2.59 / +8.90 over full-vocabulary |"
    assert {rows[r][8] for r in ("OPD (log-ratio)", "OPD + clip")} == {"0.050"}  # equal, never bold
    out = root / "tables" / "poweropd_main"
    for png in ("overlap.png", "reward_by_position.png"):
        assert (out / png).stat().st_size > 0
    with open(out / "poweropd_main.csv") as f:
        assert next(csv.reader(f))[-1] == "paper"
    # the α table keeps the sampled-token log-ratio and power runs only
    alpha = run_tables(root, "poweropd_alpha")
    assert "| OPD (log-ratio) | 1 |" in alpha and "OPD + clip" not in alpha and "full-vocabulary" not in alpha


def test_geometry_table_reads_the_last_param_diagnostics_and_the_first_locking_step(tmp_path):
    root = tmp_path / "sweep"
    for i, (objective, sparsity) in enumerate((("sft", 0.6), ("sft", 0.8), ("sampled_token", 0.7))):
        make_run(root / str(i), "log_ratio", 1.0, i, 0.1, 0.1, objective=objective,
                 extra={"diag/param/all/sparsity": sparsity, "diag/param/all/stable_rank": 3.0})
        (root / str(i) / "diag").mkdir()
        (root / str(i) / "diag" / "locking.json").write_text(json.dumps({"25": 0.9, "100": 1.0, "5": 0.5 + i / 10}))
    text = run_tables(root, "geometry_sparsity")
    head = next(line for line in text.splitlines() if line.startswith("| row")).split(" | ")
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in text.splitlines() if line.startswith("| ")}
    col = {name: head.index(name) for name in ("bf16 sparsity", "stable rank", "Sim_K(first, end)")}
    assert rows["SFT"][col["bf16 sparsity"]] == "0.7 ± 0.14"
    assert rows["SFT"][col["stable rank"]] == "3 ± 0"
    assert rows["SFT"][col["Sim_K(first, end)"]] == "0.55 ± 0.071"  # step 5 of runs 0, 1: 0.5, 0.6
    assert rows["SFT"][-1] == "8.1 % |" and rows["OPD (log-ratio)"][-1] == "51.6 % |"
    brief = run_tables(root, "geometry_sparsity", brief=True)  # the mean over benchmarks only
    head = next(line for line in brief.splitlines() if line.startswith("| row"))
    assert "toy_L1" not in head and head.startswith("| row | seeds | mean avg@8 | mean pass@8 | bf16 sparsity")


def test_multi_teacher_table_rows_by_teacher_and_level_groups(tmp_path):
    """Routed and one-teacher runs get their own rows, named by teachers (and the tags each
    scores); the level-group columns are means over those levels before and after."""
    root = tmp_path / "mt"
    for name, pair in (("routed", {"teacher": {"path": "toy:a"}, "teachers": {"long": {"path": "toy:b"}},
                                   "routes": {"L2": "long"}}),
                       ("a_only", {"teacher": {"path": "toy:a"}})):
        for seed in (0, 1):
            d = root / name / f"seed{seed}"
            d.mkdir(parents=True)
            cfg = schema_cfg({"pair": pair, "trainer": {"seed": seed}, "eval": {"benchmarks": BENCHES}})
            (d / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
            after = (0.5, 0.4) if name == "routed" else (0.5, 0.1)
            recs = [{"step": 0, "eval/toy_L1/avg@8": 0.2, "eval/toy_L2/avg@8": 0.0, "eval/avg@8": 0.1},
                    {"step": 1, "train/grad_norm": 1.0},
                    {"step": 1, "eval/toy_L1/avg@8": after[0], "eval/toy_L2/avg@8": after[1] + 0.1 * seed,
                     "eval/avg@8": (after[0] + after[1] + 0.1 * seed) / 2}]
            (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
            (d / "final_metrics.json").write_text("{}")
    text = run_tables(root, "multi_teacher", brief=True)
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
             if line.startswith("| row") or line.startswith("| toy:")]
    header, rows = cells[0], {r[0]: dict(zip(cells[0], r)) for r in cells[1:]}
    assert set(rows) == {"toy:a (the rest) + toy:b (L2) · OPD (log-ratio)", "toy:a · OPD (log-ratio)"}
    routed, only_a = rows["toy:a (the rest) + toy:b (L2) · OPD (log-ratio)"], rows["toy:a · OPD (log-ratio)"]
    # group L1–L3 = the evaluated L1, L2: routed (0.5 + 0.4) / 2, (0.5 + 0.5) / 2 → 0.475 ± 0.035;
    # toy:a alone (0.5 + 0.1) / 2, (0.5 + 0.2) / 2 → 0.325 ± 0.035; before (0.2 + 0) / 2 = 0.1
    assert routed["L1–L3 avg@k after"] == "**0.475 ± 0.035**"
    assert only_a["L1–L3 avg@k after"] == "0.325 ± 0.035"
    assert routed["L1–L3 avg@k before"] == only_a["L1–L3 avg@k before"] == "0.100 ± 0.000"
    assert routed["L4–L6 avg@k after"] == "–"  # no level of the group evaluated
