#!/usr/bin/env bash
# OPD across tokenizers (docs/objectives.md, "Across tokenizers") at toy scale, 3 seeds each: the
# Qwen3.6-vocabulary toy teacher for the Qwen2.5-vocabulary toy student (+experiment=
# cross_tokenizer_toy) — log-ratio and PowerOPD (α = 0.5) on chunks, top-K mapped by byte prefixes
# (LSM) and GOLD's sorted-L1 ULD on the same rollouts — beside the same-skill teacher on the
# student's own tokenizer (pair=toy_qwen25, its template) with the same three estimators; then
# the table. 40 steps of 16 prompts × 4 rollouts, vLLM rollouts and teacher (two engines on a
# 24 GiB CPU machine: VLLM_CPU_KVCACHE_SPACE=1), Avg@8 on 32 problems per level.
# Extra overrides pass through to every run (e.g. trainer.threads=1).
#   bash scripts/reproduce_cross_tokenizer.sh          # 21 runs
# A killed script is re-run as it is: finished runs are skipped.
set -euo pipefail
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
out=${OUT:-multirun/reproduce/cross_tokenizer}
budget=(rollout=vllm teacher=vllm trainer.steps=40 eval.every=40 eval.max_problems=32)
same=(pair=toy_qwen25 pair.teacher_prompt=own)
python -m opd_exp train +sweep=seeds +experiment=cross_tokenizer_toy reward=log_ratio,power reward.alpha=0.5 \
  "${budget[@]}" "hydra.sweep.dir=$out/cross/sampled_token" "$@"
python -m opd_exp train +sweep=seeds +experiment=cross_tokenizer_toy objective=topk xtok.loss=lsm,uld \
  "${budget[@]}" "hydra.sweep.dir=$out/cross/topk" "$@"
python -m opd_exp train +sweep=seeds +experiment=cross_tokenizer_toy reward=log_ratio,power reward.alpha=0.5 \
  "${same[@]}" "${budget[@]}" "hydra.sweep.dir=$out/same/sampled_token" "$@"
python -m opd_exp train +sweep=seeds +experiment=cross_tokenizer_toy objective=topk "${same[@]}" \
  "${budget[@]}" "hydra.sweep.dir=$out/same/topk" "$@"
python -m opd_exp tables "$out" --table cross_tokenizer
