#!/usr/bin/env bash
# The toy experiments of docs/results.md: the four "Rethinking OPD" runs, the same plain OPD from
# the standard toy pair (reference) and PowerOPD's Base pair (log-ratio vs power), 3 seeds each
# (one Hydra multirun per row), then the table. Extra overrides pass through to every run.
#   bash sweeps/rethinking_toy.sh                     # ~21 runs of ~4-6 min on 2 CPU cores
#   OUT=multirun/rt bash sweeps/rethinking_toy.sh trainer.threads=1
set -euo pipefail
out=${OUT:-multirun/rethinking_toy}
seeds=${SEEDS:-0,1,2}
run() {  # run NAME OVERRIDES…: one multirun over the seeds into $out/NAME/seed<N>
  local name=$1; shift
  python -m opd_exp train --multirun "$@" "trainer.seed=$seeds" "hydra.sweep.dir=$out/$name" \
    'hydra.sweep.subdir=seed${trainer.seed}'
}
run reference +experiment=rethinking_mismatch_toy pair=toy "$@"
run mismatch +experiment=rethinking_mismatch_toy "$@"
run coldstart +experiment=rethinking_coldstart_toy "$@"
run aligned_prompts +experiment=rethinking_aligned_prompts_toy "$@"
run no_new_capability +experiment=rethinking_no_new_capability_toy "$@"
run base_log_ratio +experiment=powerOPD_base_toy reward=log_ratio "$@"
run base_power +experiment=powerOPD_base_toy "$@"
python scripts/compare_runs.py --baseline base_log_ratio \
  "reference=$out/reference/seed*" "mismatch=$out/mismatch/seed*" "coldstart=$out/coldstart/seed*" \
  "aligned_prompts=$out/aligned_prompts/seed*" "no_new_capability=$out/no_new_capability/seed*" \
  "base_log_ratio=$out/base_log_ratio/seed*" "base_power=$out/base_power/seed*"
