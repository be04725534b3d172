"""Paper-shaped tables from the run directories of a sweep (`python -m opd_exp tables`).

Every directory under SWEEP_DIR holding a `config.yaml` is a run. A run is finished when it wrote
`final_metrics.json`; the others are listed as unfinished, never averaged in. Runs are grouped
into rows by the table's rule (e.g. the reward and its α); seeds of one row give mean ± std.
Columns: for each benchmark of the runs' `eval.benchmarks`, Avg@k and Pass@k at the last
evaluation, the mean over benchmarks, and the table's own extra columns; the best mean of each
Avg/Pass column is marked in bold. The paper's numbers (SPEC §5) are printed beside ours.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from omegaconf import OmegaConf

from opd_exp.runtime.plots import read_metrics, series


@dataclass
class Run:
    path: Path
    cfg: dict
    records: list[dict]
    finished: bool


@dataclass(frozen=True)
class Table:
    title: str
    row: Callable[[dict], str]  # the row a run belongs to, from its resolved config
    # extra columns: name → value from a run's records and the eval's k
    extra: dict[str, Callable[[list[dict], int], float]] = field(default_factory=dict)
    paper: str = ""  # the paper's numbers, as SPEC §5 gives them


def find_runs(sweep_dir: Path) -> list[Run]:
    runs = []
    for cfg_path in sorted(sweep_dir.rglob("config.yaml")):
        d = cfg_path.parent
        if d.name == ".hydra" or "checkpoints" in d.parts:
            continue
        metrics = d / "metrics.jsonl"
        runs.append(Run(d, OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=True),
                        read_metrics(metrics) if metrics.exists() else [],
                        (d / "final_metrics.json").exists()))
    return runs


def last(records: list[dict], key: str) -> float:
    values = series(records, key)[1]
    return values[-1] if values else float("nan")


def mean_of(records: list[dict], key: str) -> float:
    values = series(records, key)[1]
    return statistics.fmean(values) if values else float("nan")


def method(cfg: dict) -> str:
    """A run's method in the papers' words."""
    o, r = cfg["objective"], cfg["reward"]
    if o["name"] == "sft":
        return "SFT"
    if o["name"] == "full_vocab":
        return "full-vocabulary OPD"
    if o["name"] == "topk":
        return "LSM (top-K)"
    if r["name"] == "verifiable":
        return "RLVR"
    if r["name"] == "power":
        return f"PowerOPD (α = {r['alpha']:g})"
    name = {"log_ratio": "OPD (log-ratio)", "log_clip": "OPD + clip", "log_tanh": "OPD + tanh",
            "zscore": "OPD + z-score", "mix": "OPD + RLVR mix"}.get(r["name"], r["name"])
    return name + (" + mask" if o.get("special_mask") else "")


TABLES: dict[str, Table] = {
    "poweropd_alpha": Table(
        "PowerOPD: α sweep", method,
        {"grad norm (mean)": lambda recs, k: mean_of(recs, "train/grad_norm"),
         "reward min (mean)": lambda recs, k: mean_of(recs, "reward/min")},
        "PowerOPD (SPEC §5): gradient norms > 3000× smaller than vanilla OPD; the authors' "
        "script default α moved between 0.4 and 5 across versions"),
    "poweropd_main": Table(
        "PowerOPD: main comparison", method,
        {"grad norm (mean)": lambda recs, k: mean_of(recs, "train/grad_norm")},
        "PowerOPD (SPEC §5), Avg@8 / Pass@8 gains of PowerOPD: up to +6.37 / +5.71 over vanilla "
        "OPD, +3.01 / +3.54 over post-hoc stabilisation, +2.59 / +8.90 over full-vocabulary OPD"),
    "lsm_single_task": Table(
        "Revisiting OPD: local support matching", method, {},
        "LSM (SPEC §5), 5-benchmark math average: student 28.2, teacher 56.0, sampled-token OPD "
        "36.4, + mask 40.7, LSM 41.7"),
    "rethinking_recovery": Table(
        "Rethinking OPD: failing pairs and recipes",
        lambda c: f"{c['pair']['name']} · {c['schedule']['name']} · {c['prompts']['name']} · {method(c)}",
        {"gap recovered": lambda recs, k: last(recs, "eval/gap_recovery"),
         "teacher avg": lambda recs, k: last(recs, f"teacher/eval/avg@{k}")},
        "Rethinking OPD (SPEC §2, §5): OPD fails from a teacher with another thinking pattern "
        "or with nothing new; an off-policy cold start and teacher-aligned prompts recover it"),
    "geometry_sparsity": Table(
        "Parameter geometry of SFT, OPD and RLVR", method,
        {"bf16 sparsity": lambda recs, k: last(recs, "diag/param/all/sparsity"),
         "stable rank": lambda recs, k: last(recs, "diag/param/all/stable_rank")},
        "Parameter geometry (SPEC §5), bf16 update sparsity: SFT 8.1 %, OPD 51.6 %, RLVR 77.2 %"),
}


def columns(runs: list[Run]) -> tuple[list[str], int]:
    """(benchmarks, k) of the finished runs (their union, in config order)."""
    benches: list[str] = []
    for r in runs:
        benches += [b for b in r.cfg["eval"]["benchmarks"] if b not in benches]
    ks = {r.cfg["eval"]["k"] for r in runs}
    if len(ks) > 1:
        raise SystemExit(f"runs evaluated with different eval.k: {sorted(ks)}")
    return benches, ks.pop() if ks else 8


# keys that never make two runs different rows: the seed is the sweep's repeat axis, the rest is
# bookkeeping
NOT_A_ROW = ("trainer.seed", "trainer.threads", "trainer.resume", "trainer.overwrite",
             "trainer.allow_config_change", "logger.", "diag.", "probe.")


def flat(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        return {k: v for key, sub in node.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: json.dumps(node)}


def row_labels(runs: list[Run], table: Table) -> dict[Path, str]:
    """Each run's row: the runs equal in every setting but the seed share one; its label is the
    table's (e.g. the method), plus the settings that tell apart rows with the same label."""
    settings = {r.path: {k: v for k, v in flat(r.cfg).items() if not k.startswith(NOT_A_ROW)}
                for r in runs}
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault(tuple(sorted(settings[r.path].items())), []).append(r)
    by_label: dict[str, list[tuple]] = {}
    for g, members in groups.items():
        by_label.setdefault(table.row(members[0].cfg), []).append(g)
    labels = {}
    for label, gs in by_label.items():
        differ = sorted({k for g in gs for k, v in g if any(dict(h).get(k) != v for h in gs)})
        for g in gs:
            extra = ", ".join(f"{k}={json.loads(dict(g)[k]) if k in dict(g) else '–'}" for k in differ)
            for r in groups[g]:
                labels[r.path] = f"{label} [{extra}]" if extra else label
    return labels


def build(runs: list[Run], table: Table) -> tuple[list[str], dict[str, dict[str, list[float]]]]:
    """(column names, row → column → the values of its seed runs)."""
    done = [r for r in runs if r.finished]
    labels = row_labels(done, table)
    benches, k = columns(done)
    cols = [f"{b} {m}@{k}" for b in benches for m in ("avg", "pass")]
    cols += [f"mean {m}@{k}" for m in ("avg", "pass")] + list(table.extra)
    rows: dict[str, dict[str, list[float]]] = {}
    for r in done:
        vals = {f"{b} {m}@{k}": last(r.records, f"eval/{b}/{m}@{k}") for b in benches for m in ("avg", "pass")}
        for m in ("avg", "pass"):
            vals[f"mean {m}@{k}"] = mean_finite([vals[f"{b} {m}@{k}"] for b in benches])
        vals.update({name: fn(r.records, k) for name, fn in table.extra.items()})
        row = rows.setdefault(labels[r.path], {c: [] for c in cols})
        for c in cols:
            row[c].append(vals[c])
    return cols, rows


def mean_finite(values: list[float]) -> float:
    v = [x for x in values if not math.isnan(x)]
    return statistics.fmean(v) if v else float("nan")


def cell(values: list[float]) -> tuple[float, str]:
    """(mean, "mean ± std" over the seeds; just the value for one run; "–" for none)."""
    v = [x for x in values if not math.isnan(x)]
    if not v:
        return float("nan"), "–"
    m = statistics.fmean(v)
    return m, f"{m:.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{m:.3f}"


def markdown(name: str, table: Table, cols: list[str], rows: dict, runs: list[Run]) -> str:
    best = {}
    for c in cols:
        if "@" in c:  # accuracy columns: higher is better
            means = [cell(rows[r][c])[0] for r in rows]
            finite = [m for m in means if not math.isnan(m)]
            best[c] = max(finite) if finite else None
    lines = [f"## {table.title} (`{name}`)", "", "| row | seeds | " + " | ".join(cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for r in sorted(rows):
        cells = []
        for c in cols:
            m, text = cell(rows[r][c])
            cells.append(f"**{text}**" if best.get(c) is not None and m == best[c] else text)
        lines.append(f"| {r} | {len(rows[r][cols[0]])} | " + " | ".join(cells) + " |")
    lines += ["", f"Paper: {table.paper}" if table.paper else "Paper: –"]
    unfinished = [str(r.path) for r in runs if not r.finished]
    lines += ["", "Unfinished or failed runs (not averaged in): " +
              (", ".join(unfinished) if unfinished else "none")]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, cols: list[str], rows: dict) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "seeds"] + [x for c in cols for x in (f"{c} mean", f"{c} std")])
        for r in sorted(rows):
            out = [r, len(rows[r][cols[0]])]
            for c in cols:
                v = [x for x in rows[r][c] if not math.isnan(x)]
                out += [statistics.fmean(v) if v else "", statistics.stdev(v) if len(v) > 1 else ""]
            w.writerow(out)


def write_plots(runs: list[Run], table: Table, out_dir: Path, k: int) -> list[Path]:
    """Per row, the mean over its seeds by step: gradient norm (log scale), Avg@k, response length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, log, fname in (("train/grad_norm", True, "grad_norm"), (f"eval/avg@{k}", False, "avg"),
                            ("rollout/response_len", False, "response_len")):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        by_row: dict[str, list[dict[int, float]]] = {}
        done = [r for r in runs if r.finished]
        labels = row_labels(done, table)
        for r in done:
            by_row.setdefault(labels[r.path], []).append(dict(zip(*series(r.records, key))))
        for name, per in sorted(by_row.items()):
            steps = sorted(set.intersection(*(set(p) for p in per)))
            ax.plot(steps, [statistics.fmean(p[s] for p in per) for s in steps], label=name,
                    marker="o" if fname == "avg" else None)
        ax.set(xlabel="step", ylabel=key, yscale="log" if log else "linear", title=key)
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out_dir / f"{fname}.png", dpi=100)
        plt.close(fig)
        written.append(out_dir / f"{fname}.png")
    return written


def run_tables(sweep_dir: Path, name: str, out_dir: Path | None = None) -> str:
    if name not in TABLES:
        raise SystemExit(f"error: --table {name} is not allowed: one of {', '.join(TABLES)}")
    runs = find_runs(sweep_dir)
    if not any(r.finished for r in runs):
        raise SystemExit(f"error: no finished run under {sweep_dir} (a run is finished when it "
                         "has written final_metrics.json)")
    table = TABLES[name]
    cols, rows = build(runs, table)
    out_dir = out_dir or sweep_dir / "tables" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(name, table, cols, rows, runs)
    (out_dir / f"{name}.md").write_text(text)
    write_csv(out_dir / f"{name}.csv", cols, rows)
    write_plots(runs, table, out_dir, columns([r for r in runs if r.finished])[1])
    labels = row_labels([r for r in runs if r.finished], table)
    (out_dir / "runs.json").write_text(json.dumps(
        {str(r.path): {"row": labels.get(r.path), "finished": r.finished} for r in runs}, indent=1))
    return text
