"""What each component must offer the loop: small Protocols (≤ 4 methods each).

Implementations: rollouts, teachers and learners in opd_exp/engines/, objectives in
opd_exp/methods/, loggers in opd_exp/runtime/loggers.py. Names → implementations:
opd_exp/config/registry.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from opd_exp.core.types import Rollouts, Sampling, StepBatch, TeacherScores


class RolloutBackend(Protocol):
    def generate(self, prompts: list[list[int]], sampling: Sampling) -> Rollouts:
        """`n` samples for each prompt (token ids, unpadded); rows grouped by prompt; CPU tensors."""

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the sampler use `model`'s current weights."""


class Teacher(Protocol):
    def score(self, rollouts: Rollouts, needs: str, k: int = 0) -> TeacherScores:
        """`needs` is the objective's `teacher_needs` (config/registry.py TEACHER_NEEDS); `k` the
        top-K size. Scores come back on the device of `rollouts`."""


class PolicyView(Protocol):
    """What an objective may ask of the model it differentiates (the learner hands it one):
    never the model itself, so no objective depends on a model's internals."""
    lm_head: torch.nn.Module  # the output projection, [V_rows, H] weight
    # the tokenizer's real vocabulary V <= V_rows: rows past it (embedding padding, e.g.
    # R1-Distill-Qwen 151,936 / 152,064 rows for 151,665 tokens) are never tokens and take part in
    # no objective or support; None = every row
    vocab_size: int | None

    def token_logprobs(self, rollouts: Rollouts, temperature: float = 1.0) -> torch.Tensor:
        """log softmax(logits / temperature) of each response token: [B, T] (masked)."""

    def response_hidden(self, rollouts: Rollouts) -> torch.Tensor:
        """Final hidden states at the positions that predict the response tokens: [B, T, H]."""


class Objective(Protocol):
    teacher_needs: str  # none | sampled | topk | hidden (see TeacherScores)
    needs_old_logp: bool  # the step computes the learner's log-probs before the update
    temperature: float  # the sampling temperature the learner's log-probs are taken at

    def prepare(self, batch: StepBatch) -> tuple[StepBatch, dict[str, float]]:
        """Once per rollout batch, no gradient: rewards, advantages and their statistics."""

    def loss(self, policy: PolicyView, mb: StepBatch, n_tokens: float) -> tuple[torch.Tensor, dict]:
        """A micro-batch's share of the step loss (already / `n_tokens`) and additive metrics."""


class Learner(Protocol):
    policy: torch.nn.Module  # the student with its whole current weights (sampling, saving)

    def logprobs(self, batch: StepBatch, temperature: float) -> torch.Tensor:
        """log p(y_t) of every response token under the current weights, no gradient: [B, T]."""

    def update(self, batch: StepBatch, objective: Objective) -> dict[str, float]:
        """One or more optimizer steps on the batch; train/ metrics."""

    def save(self, directory: Path) -> None: ...

    def load(self, directory: Path) -> None: ...


class Logger(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def finish(self) -> None: ...
