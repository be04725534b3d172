#!/usr/bin/env bash
# "Rethinking OPD" (SPEC §2, §5) at toy scale on 2 CPU cores: plain OPD from the standard pair
# (reference), from a teacher with another pattern of thought (mismatch), the two recipes on that
# pair (off-policy cold start, teacher-aligned prompts), and from a teacher with nothing new;
# 3 seeds each, 50 OPD steps (the cold start adds its 60 SFT steps), evals on 32 problems per
# level, token diagnostics every 5 steps (the overlap curves); then the table.
# Extra overrides pass through to every run (e.g. trainer.threads=1).
#   bash scripts/reproduce_rethinking.sh               # 15 runs, wall time in docs/results.md
# A killed script is re-run as it is: finished runs are skipped. GPU/Slurm: reproduce_slurm.sh.
set -euo pipefail
out=${OUT:-multirun/reproduce/rethinking}
extra=("$@")
run() {  # run ROW OVERRIDES…: one Hydra multirun over the seeds into $out/ROW/seed<N>
  local row=$1; shift  # the script's own settings first: the caller's overrides come last and win
  python -m opd_exp train +sweep=seeds "$@" eval.max_problems=32 diag.every=5 \
    "hydra.sweep.dir=$out/$row" 'hydra.sweep.subdir=seed${trainer.seed}' ${extra[@]+"${extra[@]}"}
}
opd=(trainer.steps=50 eval.every=50)
run reference +experiment=rethinking_mismatch_toy pair=toy "${opd[@]}"
run mismatch +experiment=rethinking_mismatch_toy "${opd[@]}"
run coldstart +experiment=rethinking_coldstart_toy trainer.steps=110 eval.every=60
run aligned_prompts +experiment=rethinking_aligned_prompts_toy "${opd[@]}"
run no_new_capability +experiment=rethinking_no_new_capability_toy "${opd[@]}"
python -m opd_exp tables "$out" --table rethinking_recovery
