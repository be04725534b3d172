#!/usr/bin/env bash
# The parameter-geometry runs of docs/results.md, 3 seeds each (one Hydra multirun per arm):
#   geometry_toy at lr 2e-6: OPD, SFT, RLVR (one budget: 50 steps x 64 sequences);
#   geometry_constrained_toy at the default lr: OPD and SFT, each free and subspace-constrained;
#   the failing pair (foreign-pattern teacher) with the same token diagnostics, for the overlap curves.
# Then `python -m opd_exp tables`-style summaries by scripts/geometry_table.py.
#   bash sweeps/geometry_toy.sh                         # 24 runs of ~3-4 min on 2 CPU cores
#   ARMS="opd sft" OUT=multirun/g bash sweeps/geometry_toy.sh trainer.threads=1   # a subset
set -euo pipefail
out=${OUT:-multirun/geometry_toy}
seeds=${SEEDS:-0,1,2}
arms=${ARMS:-"opd sft rlvr opd_free opd_constrained sft_free sft_constrained mismatch"}
run() {  # run NAME OVERRIDES…: one multirun over the seeds into $out/NAME/seed<N>
  local name=$1; shift
  [[ " $arms " == *" $name "* ]] || return 0
  python -m opd_exp train --multirun "$@" "trainer.seed=$seeds" "hydra.sweep.dir=$out/$name" \
    'hydra.sweep.subdir=seed${trainer.seed}'
}
rlvr=(reward=verifiable objective.clip_eps_high=0.28 rollout.n=8 data.prompts_per_step=8)
run opd +experiment=geometry_toy "$@"
run sft +experiment=geometry_toy objective=sft "$@"
run rlvr +experiment=geometry_toy "${rlvr[@]}" "$@"
run opd_free +experiment=geometry_constrained_toy learner.subspace_constraint=false "$@"
run opd_constrained +experiment=geometry_constrained_toy "$@"
run sft_free +experiment=geometry_constrained_toy objective=sft learner.subspace_constraint=false "$@"
run sft_constrained +experiment=geometry_constrained_toy objective=sft "$@"
run mismatch +experiment=geometry_constrained_toy pair=toy_foreign learner.subspace_constraint=false "$@"
python scripts/geometry_table.py "$out"
