#!/usr/bin/env bash
# PowerOPD α sweep on the toy pair (SPEC §1.2 values), one Hydra multirun; extra overrides pass through.
#   bash sweeps/powerOPD_alpha_toy.sh trainer.steps=100
set -euo pipefail
python -m opd_exp train --multirun +experiment=powerOPD_toy reward.alpha=0.1,0.25,0.5,1,2,5 "$@"
