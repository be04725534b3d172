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
import re
import statistics
from pathlib import Path

from opd_exp.analysis.papers import TABLES
from opd_exp.analysis.runs import Run, Table, find_runs, last, mean_of
from opd_exp.runtime.plots import series


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


RATIO = "baseline ÷ this grad norm"


def build(runs: list[Run], table: Table,
          brief: bool = False) -> tuple[list[str], dict[str, dict[str, list[float]]]]:
    """(column names, row → column → the values of its seed runs); `brief`: the mean over
    benchmarks without the per-benchmark columns."""
    done = [r for r in runs if r.finished]
    labels = row_labels(done, table)
    benches, k = columns(done)
    cols = [] if brief else [f"{b} {m}@{k}" for b in benches for m in ("avg", "pass")]
    cols += [f"mean {m}@{k}" for m in ("avg", "pass")] + list(table.extra)
    base = [mean_of(r.records, "train/grad_norm") for r in done if table.baseline and table.baseline(r.cfg)]
    base_norm = mean_finite(base) if base else None
    cols += [RATIO] if base_norm is not None else []
    rows: dict[str, dict[str, list[float]]] = {}
    for r in done:
        vals = {f"{b} {m}@{k}": last(r.records, f"eval/{b}/{m}@{k}") for b in benches for m in ("avg", "pass")}
        for m in ("avg", "pass"):
            vals[f"mean {m}@{k}"] = mean_finite([vals[f"{b} {m}@{k}"] for b in benches])
        vals.update({name: fn(r, k) for name, fn in table.extra.items()})
        if base_norm is not None:  # the baseline's mean over the seeds ÷ this run's mean over its steps
            vals[RATIO] = base_norm / mean_of(r.records, "train/grad_norm")
        row = rows.setdefault(labels[r.path], {c: [] for c in cols})
        for c in cols:
            row[c].append(vals[c])
    return cols, rows


def paper_cells(runs: list[Run], table: Table) -> dict[str, str]:
    """Row → the paper's number for it (the table's paper_row), when the table has one."""
    if table.paper_row is None:
        return {}
    done = [r for r in runs if r.finished]
    labels = row_labels(done, table)
    return {labels[r.path]: table.paper_row(r.cfg) for r in done}


def mean_finite(values: list[float]) -> float:
    v = [x for x in values if not math.isnan(x)]
    return statistics.fmean(v) if v else float("nan")


def cell(values: list[float], spec: str = ".3f") -> tuple[float, str]:
    """(mean, "mean ± std" over the seeds; just the value for one run; "–" for none), the mean in
    format `spec`, the std in the same or (significant-digit formats) with 2 digits."""
    v = [x for x in values if not math.isnan(x)]
    if not v:
        return float("nan"), "–"
    m = statistics.fmean(v)
    sd_spec = ".2g" if spec.endswith("g") else spec
    return m, f"{m:{spec}} ± {statistics.stdev(v):{sd_spec}}" if len(v) > 1 else f"{m:{spec}}"


def number_format(column: str) -> str:
    """Accuracies with 3 decimals; every other column (gradient norms, geometry: 1 − 7e-6,
    4e-4) with 4 significant digits, so small values never print as 0.000."""
    return ".3f" if "@" in column else ".4g"


def markdown(name: str, table: Table, cols: list[str], rows: dict, runs: list[Run]) -> str:
    best = {}
    for c in cols:
        if "@" in c and "before" not in c:  # accuracy after training: higher is better
            means = [cell(rows[r][c])[0] for r in rows]  # the mean does not depend on the format
            finite = [m for m in means if not math.isnan(m)]
            best[c] = max(finite) if finite else None
    paper = paper_cells(runs, table)
    head = cols + (["paper"] if paper else [])
    lines = [f"## {table.title} (`{name}`)", "", "| row | seeds | " + " | ".join(head) + " |",
             "|---|---|" + "---|" * len(head)]
    for r in sorted(rows):
        cells = []
        for c in cols:
            m, text = cell(rows[r][c], number_format(c))
            cells.append(f"**{text}**" if best.get(c) is not None and m == best[c] else text)
        cells += [paper.get(r) or "–"] if paper else []
        lines.append(f"| {r} | {len(rows[r][cols[0]])} | " + " | ".join(cells) + " |")
    lines += ["", f"Paper: {table.paper}" if table.paper else "Paper: –"]
    if RATIO in cols:
        lines += ["", f"`{RATIO}`: the baseline row's mean `train/grad_norm` (before clipping, over "
                  "steps and seeds) divided by each run's own."]
    unfinished = [str(r.path) for r in runs if not r.finished]
    lines += ["", "Unfinished or failed runs (not averaged in): " +
              (", ".join(unfinished) if unfinished else "none")]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, cols: list[str], rows: dict, paper: dict[str, str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "seeds"] + [x for c in cols for x in (f"{c} mean", f"{c} std")] +
                   (["paper"] if paper else []))
        for r in sorted(rows):
            out = [r, len(rows[r][cols[0]])]
            for c in cols:
                v = [x for x in rows[r][c] if not math.isnan(x)]
                out += [statistics.fmean(v) if v else "", statistics.stdev(v) if len(v) > 1 else ""]
            w.writerow(out + ([paper.get(r, "")] if paper else []))


POSITION = re.compile(r"diag/token/log_ratio_pos(\d+)_(\d+)_mean$")


def by_row(runs: list[Run], table: Table) -> dict[str, list[Run]]:
    done = [r for r in runs if r.finished]
    labels = row_labels(done, table)
    rows: dict[str, list[Run]] = {}
    for r in done:
        rows.setdefault(labels[r.path], []).append(r)
    return dict(sorted(rows.items()))


def curve(ax, rows: dict[str, list[Run]], key: str, style: str = "-", suffix: str = "") -> bool:
    """Per row, the mean over its seed runs of `key` at the steps all of them logged; False when
    no run logged it."""
    drawn = False
    for name, members in rows.items():
        per = [dict(zip(*series(r.records, key))) for r in members]
        steps = sorted(set.intersection(*(set(p) for p in per)))
        if steps:
            ax.plot(steps, [statistics.fmean(p[s] for p in per) for s in steps], style,
                    label=name + suffix, marker="o" if len(steps) < 6 else None)
            drawn = True
    return drawn


def write_plots(runs: list[Run], table: Table, out_dir: Path, k: int) -> list[Path]:
    """Per row, means over its seeds: gradient norm (log scale), Avg@k and response length by
    step; the log-ratio by response position and the teacher/student top-K overlap by step when
    the runs logged token diagnostics (diag.every)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = by_row(runs, table)
    written = []

    def save(fig, ax, fname: str) -> None:
        if ax.get_legend_handles_labels()[0]:  # nothing drawn (e.g. no evaluation): no legend
            ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out_dir / f"{fname}.png", dpi=100)
        written.append(out_dir / f"{fname}.png")

    for key, log, fname in (("train/grad_norm", True, "grad_norm"), (f"eval/avg@{k}", False, "avg"),
                            ("rollout/response_len", False, "response_len")):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        curve(ax, rows, key)
        ax.set(xlabel="step", ylabel=key, yscale="log" if log else "linear", title=key)
        save(fig, ax, fname)
        plt.close(fig)

    buckets = sorted({(int(m[1]), int(m[2])) for rs in rows.values() for r in rs for rec in r.records
                      for key in rec if (m := POSITION.match(key))})
    if buckets:  # mean over the diagnostic steps and the seeds, per position bucket
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name, members in rows.items():
            ys = [mean_finite([mean_of(r.records, f"diag/token/log_ratio_pos{a}_{b}_mean") for r in members])
                  for a, b in buckets]
            ax.plot(range(len(buckets)), ys, marker="o", label=name)
        ax.set_xticks(range(len(buckets)), [f"{a}–{b}" for a, b in buckets], fontsize=7)
        ax.set(xlabel="response position", ylabel="log p_teacher − log p_student (mean)",
               title="sampled-token log-ratio by position")
        save(fig, ax, "reward_by_position")
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if curve(ax, rows, "diag/token/mass_teacher", "-", " · teacher mass on ∩"):
        curve(ax, rows, "diag/token/ratio", "--", " · |∩|/K")
        ax.set(xlabel="step", ylabel="top-K overlap", ylim=(0, 1.02), title="teacher/student top-K overlap")
        save(fig, ax, "overlap")
    plt.close(fig)
    return written


def run_tables(sweep_dir: Path, name: str, out_dir: Path | None = None, brief: bool = False) -> str:
    if name not in TABLES:
        raise SystemExit(f"error: --table {name} is not allowed: one of {', '.join(TABLES)}")
    table = TABLES[name]
    runs = [r for r in find_runs(sweep_dir) if table.keep(r.cfg)]
    if not any(r.finished for r in runs):
        raise SystemExit(f"error: no finished run under {sweep_dir} (a run is finished when it "
                         "has written final_metrics.json)")
    cols, rows = build(runs, table, brief)
    out_dir = out_dir or sweep_dir / "tables" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(name, table, cols, rows, runs)
    (out_dir / f"{name}.md").write_text(text)
    write_csv(out_dir / f"{name}.csv", cols, rows, paper_cells(runs, table))
    write_plots(runs, table, out_dir, columns([r for r in runs if r.finished])[1])
    labels = row_labels([r for r in runs if r.finished], table)
    (out_dir / "runs.json").write_text(json.dumps(
        {str(r.path): {"row": labels.get(r.path), "finished": r.finished} for r in runs}, indent=1))
    return text
