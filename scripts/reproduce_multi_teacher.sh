#!/usr/bin/env bash
# Multi-teacher OPD at toy scale on 2 CPU cores: the student learns from two specialists routed by
# level (L1-L3 -> toy:teacher_short, L4-L6 -> toy:teacher_long), against each specialist alone;
# 3 seeds each, 50 steps of top-16 OPD (the Rethinking reference row's objective and budget),
# evals on 32 problems per level at 0 and 50; then the table (per-level columns in the full one).
# Extra overrides pass through to every run (e.g. trainer.threads=1).
#   bash scripts/reproduce_multi_teacher.sh            # 9 runs, wall time in docs/results.md
# A killed script is re-run as it is: finished runs are skipped.
set -euo pipefail
out=${OUT:-multirun/reproduce/multi_teacher}
extra=("$@")
run() {  # run ROW OVERRIDES…: one Hydra multirun over the seeds into $out/ROW/seed<N>
  local row=$1; shift  # the script's own settings first: the caller's overrides come last and win
  python -m opd_exp train +sweep=seeds +experiment=multi_teacher_toy "$@" eval.max_problems=32 \
    "hydra.sweep.dir=$out/$row" 'hydra.sweep.subdir=seed${trainer.seed}' ${extra[@]+"${extra[@]}"}
}
run routed
run short_only pair=toy pair.teacher.path=toy:teacher_short
run long_only pair=toy pair.teacher.path=toy:teacher_long
python -m opd_exp tables "$out" --table multi_teacher
