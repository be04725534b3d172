#!/usr/bin/env bash
# The wheel folder scripts/gpu_check.sh installs on a GPU machine without network (Linux x86_64,
# Python 3.11): the package's light dependencies and DeepSpeed (an sdist) with what it needs
# beyond torch and transformers. Nothing here is torch, vLLM or CUDA.
set -euo pipefail
OUT="${1:-gpu_wheels}"
mkdir -p "$OUT"
get() { python -m pip download --quiet --no-deps -d "$OUT" "$@"; }
get omegaconf==2.3.1 hydra-core==1.3.8 antlr4-python3-runtime==4.9.3 hjson einops py-cpuinfo \
    nvidia-ml-py deepspeed==0.19.8
get --only-binary=:all: --platform manylinux2014_x86_64 --python-version 3.11 \
    ninja msgpack psutil pydantic pydantic-core annotated-types typing-inspection
du -sh "$OUT"
