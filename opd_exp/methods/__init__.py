"""The maths layer: rewards, objectives, masking, importance weights — tensor functions and small
modules on the types of opd_exp.core. No model internals: an objective differentiates through the
`PolicyView` the learner hands it."""

from __future__ import annotations

from opd_exp.config.registry import OBJECTIVES, resolve
from opd_exp.core.protocols import Objective
from opd_exp.core.ranks import Dist


def make_objective(objective_cfg, reward_cfg, temperature: float,
                   ranks: Dist | None = None) -> Objective:
    """The objective named by `objective.name` (config/registry.py OBJECTIVES); `ranks`: the
    job's ranks, for statistics over the whole step."""
    return resolve(OBJECTIVES[objective_cfg.name])(objective_cfg, reward_cfg, temperature, ranks)
