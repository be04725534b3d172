#!/usr/bin/env bash
# The four papers' comparisons on the real pairs of SPEC §5 (the GPU/Slurm variant of
# scripts/reproduce_{poweropd,lsm,rethinking,geometry}.sh): the same sweeps on the real experiment
# files, each run a Slurm job of one GPU node (hydra/launcher=slurm, conf/hydra/launcher/slurm.yaml),
# then the same tables. Hydra's submitit launcher waits for a sweep's jobs before the next line.
#   PARTITION=gpu bash scripts/reproduce_slurm.sh poweropd [more overrides]
#   PARTITION=gpu GPUS=4 bash scripts/reproduce_slurm.sh geometry hydra.launcher.account=myproj
# Needs `pip install -e ".[slurm,vllm-gpu,deepspeed]"`, the hub models and datasets, and a shared
# filesystem. NEVER RUN HERE (no GPU, no Slurm): only its configs are tested (they compose).
set -euo pipefail
paper=${1:?which paper: poweropd, lsm, rethinking or geometry}; shift
out=${OUT:-multirun/reproduce_slurm/$paper}
slurm=(hydra/launcher=slurm "hydra.launcher.partition=${PARTITION:?set PARTITION to your GPU partition}"
       "hydra.launcher.gpus_per_node=${GPUS:-8}" "launcher.nproc_per_node=${GPUS:-8}")
train() { python -m opd_exp train "${slurm[@]}" "$@"; }
case $paper in
  poweropd)
    # main: every reward family (PowerOPD at the file's α = 0.5) and full-vocabulary OPD; the α grid
    # adds the other α values. The α table reads the log-ratio and power runs of both dirs.
    train +sweep=reward_families +experiment=powerOPD_qwen3 "hydra.sweep.dir=$out/main/sampled_token" "$@"
    # full-vocabulary OPD needs the teacher's hidden states: the HF teacher, not the file's vLLM one
    train +sweep=seeds +experiment=powerOPD_qwen3 objective=full_vocab teacher=hf "hydra.sweep.dir=$out/main/full_vocab" "$@"
    train +sweep=poweropd_alpha +experiment=powerOPD_qwen3 reward.alpha=0.1,0.25,1,2,5 "hydra.sweep.dir=$out/alpha" "$@"
    python -m opd_exp tables "$out/main" --table poweropd_main
    python -m opd_exp tables "$out" --table poweropd_alpha ;;
  lsm)
    lsm=(+sweep=seeds +experiment=lsm_qwen25)
    train "${lsm[@]}" objective=sampled_token objective.special_mask=false,true "hydra.sweep.dir=$out/sampled_token" "$@"
    train "${lsm[@]}" "hydra.sweep.dir=$out/lsm" "$@"
    python -m opd_exp tables "$out" --table lsm_single_task ;;
  rethinking)  # pair 1 (Qwen3, condition (i)) with and without each recipe; pair 2 (R1-Distill, condition (ii))
    train +sweep=seeds +experiment=rethinking_qwen3 "hydra.sweep.dir=$out/plain" "$@"
    # the cold start runs on the torch learner, one rank (DeepSpeed refuses it): the last word wins
    # ... with the cold-start steps added, so it trains as many OPD steps as the plain row
    train +sweep=seeds +experiment=rethinking_qwen3 schedule=cold_start schedule.cold_start_steps=50 \
      trainer.steps=250 learner=torch launcher.nproc_per_node=1 hydra.launcher.gpus_per_node=1 \
      "hydra.sweep.dir=$out/coldstart" "$@"
    train +sweep=seeds +experiment=rethinking_qwen3 prompts=teacher_aligned "hydra.sweep.dir=$out/aligned_prompts" "$@"
    train +sweep=seeds +experiment=rethinking_r1distill "hydra.sweep.dir=$out/no_new_capability" "$@"
    python -m opd_exp tables "$out" --table rethinking_recovery ;;
  geometry)
    train +sweep=geometry_trio +experiment=geometry_qwen3 +method=opd,sft,rlvr "hydra.sweep.dir=$out/trio" "$@"
    train +sweep=geometry_trio +experiment=geometry_qwen3 +method=opd,sft learner.subspace_constraint=false,true \
      "hydra.sweep.dir=$out/constrained" "$@"  # constrained from 20 % of training (learner.subspace_from)
    python -m opd_exp tables "$out/trio" --table geometry_sparsity
    python -m opd_exp tables "$out/constrained" --table geometry_constrained ;;
  *) echo "unknown paper '$paper': one of poweropd, lsm, rethinking, geometry" >&2; exit 2 ;;
esac
