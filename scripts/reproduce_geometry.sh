#!/usr/bin/env bash
# "Parameter geometry" (SPEC §4, §5) at toy scale on 2 CPU cores: the SFT / OPD / RLVR trio at
# lr 2e-6 (bf16 update sparsity, principal angles, stable rank, subspace locking) and
# subspace-constrained training (OPD and SFT, free vs constrained from step 10), 3 seeds each,
# then the tables. Extra overrides pass through to every run (e.g. trainer.threads=1).
#   bash scripts/reproduce_geometry.sh                  # 21 runs, wall time in docs/results.md
# A killed script is re-run as it is: finished runs are skipped. GPU/Slurm: reproduce_slurm.sh.
set -euo pipefail
out=${OUT:-multirun/reproduce/geometry}
python -m opd_exp train +sweep=geometry_trio +experiment=geometry_toy +method=opd,sft,rlvr \
  "hydra.sweep.dir=$out/trio" "$@"
python -m opd_exp train +sweep=geometry_trio +experiment=geometry_constrained_toy +method=opd,sft \
  learner.subspace_constraint=false,true "hydra.sweep.dir=$out/constrained" "$@"
python -m opd_exp tables "$out/trio" --table geometry_sparsity
python -m opd_exp tables "$out/constrained" --table geometry_constrained
