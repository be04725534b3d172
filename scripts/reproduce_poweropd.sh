#!/usr/bin/env bash
# PowerOPD (SPEC §1.2, §5) at toy scale on 2 CPU cores, 3 seeds each, then the tables:
#  main  — the standard toy pair, 40 steps: vanilla OPD (log-ratio), post-hoc clip / tanh /
#          z-score, PowerOPD (α = 0.5) and full-vocabulary OPD; evals on 32 problems per level;
#  alpha — the Base pair (the early log-ratio tail), 10 steps, no eval: log-ratio and
#          α ∈ {0.1, 0.25, 0.5, 1, 2, 5}: gradient norms and the reward's minimum.
# Extra overrides pass through to every run (e.g. trainer.threads=1).
#   bash scripts/reproduce_poweropd.sh                 # 39 runs, wall time in docs/results.md
# A killed script is re-run as it is: finished runs are skipped. GPU/Slurm: reproduce_slurm.sh.
set -euo pipefail
out=${OUT:-multirun/reproduce/poweropd}
main=(trainer.steps=40 eval.every=40 eval.max_problems=32)
python -m opd_exp train +sweep=reward_families +experiment=vanillaOPD_toy reward.alpha=0.5 "${main[@]}" \
  "hydra.sweep.dir=$out/main/sampled_token" "$@"
python -m opd_exp train +sweep=seeds +experiment=full_vocab_toy "${main[@]}" \
  "hydra.sweep.dir=$out/main/full_vocab" "$@"
alpha=(trainer.steps=10 eval.every=0)
python -m opd_exp train +sweep=poweropd_alpha +experiment=powerOPD_base_toy "${alpha[@]}" \
  "hydra.sweep.dir=$out/alpha/power" "$@"
python -m opd_exp train +sweep=seeds +experiment=powerOPD_base_toy reward=log_ratio "${alpha[@]}" \
  "hydra.sweep.dir=$out/alpha/log_ratio" "$@"
python -m opd_exp tables "$out/main" --table poweropd_main
python -m opd_exp tables "$out/alpha" --table poweropd_alpha
