"""Learner backends: own the student's trainable weights and the optimizer.

The loop calls `logprobs` (no gradient) and `update` (one or more optimizer steps on a batch);
checkpoints go through `save` / `load`. `torch` (here) is plain single-process PyTorch; other
backends (DeepSpeed ZeRO) register in BACKENDS by name.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Callable, Protocol

import torch

from opd_exp.objectives import Objective, StepBatch, token_logprobs


class Learner(Protocol):
    model: torch.nn.Module

    def logprobs(self, batch: StepBatch, temperature: float) -> torch.Tensor: ...

    def update(self, batch: StepBatch, objective: Objective) -> dict[str, float]: ...

    def save(self, directory: Path) -> None: ...

    def load(self, directory: Path) -> None: ...


def micro_slices(size: int, micro: int) -> list[slice]:
    return [slice(i, min(i + micro, size)) for i in range(0, size, micro)]


class TorchLearner:
    """AdamW with linear warm-up then a constant learning rate; global-norm gradient clipping.

    `train/grad_norm` is the total gradient norm before clipping.
    """

    def __init__(self, model: torch.nn.Module, cfg):
        self.model, self.cfg = model, cfg.learner
        c = self.cfg
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                           lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / c.warmup_steps) if c.warmup_steps else 1.0)
        model.train()

    @torch.no_grad()
    def logprobs(self, batch: StepBatch, temperature: float) -> torch.Tensor:
        return torch.cat([token_logprobs(self.model, batch.rollouts.select(s), temperature)
                          for s in micro_slices(batch.rollouts.size, self.cfg.micro_batch_size)])

    def update(self, batch: StepBatch, objective: Objective) -> dict[str, float]:
        """`learner.minibatches` optimizer steps over disjoint slices of the batch; metrics are
        token-weighted over micro-batches and averaged over minibatches."""
        c, B = self.cfg, batch.rollouts.size
        totals: dict[str, float] = defaultdict(float)
        per_mini = B // c.minibatches
        for mini in micro_slices(B, per_mini):
            mb_all = batch.select(mini)
            n_tokens = mb_all.mask_B_T.sum().clamp(min=1).item()
            self.optimizer.zero_grad(set_to_none=True)
            for s in micro_slices(mb_all.rollouts.size, c.micro_batch_size):
                loss, m = objective.loss(self.model, mb_all.select(s), n_tokens)
                loss.backward()
                for k, v in m.items():
                    totals[k] += v / c.minibatches
            params = [p for p in self.model.parameters() if p.grad is not None]
            max_norm = c.max_grad_norm if c.max_grad_norm > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
            totals["grad_norm"] += grad_norm / c.minibatches
            totals["grad_norm_max"] = max(totals["grad_norm_max"], grad_norm)
            self.optimizer.step()
            self.scheduler.step()
        totals["lr"] = self.scheduler.get_last_lr()[0]
        return dict(totals)

    def save(self, directory: Path) -> None:
        torch.save({"optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict()}, directory / "learner.pt")

    def load(self, directory: Path) -> None:
        state = torch.load(directory / "learner.pt", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def _make_torch(cfg, model) -> Learner:
    return TorchLearner(model, cfg)


BACKENDS: dict[str, Callable[..., Learner]] = {"torch": _make_torch}


def make_learner(cfg, model) -> Learner:
    return BACKENDS[cfg.learner.backend](cfg, model)
