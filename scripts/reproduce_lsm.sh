#!/usr/bin/env bash
# "Revisiting OPD" local support matching (SPEC §1.4, §5) at toy scale on 2 CPU cores: the
# standard toy pair, 40 steps, 3 seeds each — sampled-token OPD, the same with special tokens
# masked, and LSM (the teacher's top-32, top-p 0.9 rollouts, masking); then the table.
# Extra overrides pass through to every run (e.g. trainer.threads=1).
#   bash scripts/reproduce_lsm.sh                      # 9 runs, wall time in docs/results.md
# A killed script is re-run as it is: finished runs are skipped. GPU/Slurm: reproduce_slurm.sh.
set -euo pipefail
out=${OUT:-multirun/reproduce/lsm}
budget=(trainer.steps=40 eval.every=40 eval.max_problems=32)
python -m opd_exp train +sweep=seeds +experiment=vanillaOPD_toy objective.special_mask=false,true \
  "${budget[@]}" "hydra.sweep.dir=$out/sampled_token" "$@"
python -m opd_exp train +sweep=seeds +experiment=lsm_toy "${budget[@]}" "hydra.sweep.dir=$out/lsm" "$@"
python -m opd_exp tables "$out" --table lsm_single_task
