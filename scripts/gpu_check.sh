#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py) on a machine with torch + transformers and one CUDA GPU,
# no network: the package's light dependencies and DeepSpeed come from a wheel folder made here
# beforehand by scripts/gpu_wheels.sh (~10 MiB). Writes the table to ${OUT:-docs}/gpu_check.md;
# exit 1 on a mismatch. Budget: ≤ 8 minutes on one H100.
#   bash scripts/gpu_wheels.sh gpu_wheels      # on a machine with PyPI
#   bash scripts/gpu_check.sh gpu_wheels       # on the GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="${1:-gpu_wheels}"
if [ -d "$WHEELS" ]; then
  # deepspeed is an sdist: built against the torch already there, no op compiled
  DS_BUILD_OPS=0 python -m pip install --quiet --no-index --find-links "$WHEELS" --no-build-isolation \
    omegaconf hydra-core deepspeed || echo "gpu_check.sh: some wheels did not install; their rows are skipped"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 480 python scripts/gpu_check.py --device cuda --out "${OUT:-docs}/gpu_check.md"
