"""The loop layer: a run built from the config (build.py), one step of it (step.py) and its
evaluation (evaluator.py). opd_exp/train.py strings them together."""
