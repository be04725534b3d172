#!/usr/bin/env bash
# One-time set-up (idempotent): torch FIRST and pinned (an unpinned torch pulls a multi-GB CUDA
# build), then the package with its test extra. Engine extras: see README ("Engines").
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python -m pip install --quiet --disable-pip-version-check -e ".[test]"
