"""Torch learner backend (`learner=torch`, the default): plain single-process PyTorch.

A learner owns the student's trainable weights and the optimizer (the `Learner` Protocol,
opd_exp/core/protocols.py). The loop calls `logprobs` (no gradient) and `update` (one or more
optimizer steps on a batch); checkpoints go through `save` / `load`. Objectives differentiate
through `HFPolicy` views of the model; `policy` is the student with its whole current weights,
for sampling and saving. The pieces here (micro-batching, AdamW, warm-up) are shared with the
DeepSpeed learner (opd_exp/engines/learner_deepspeed.py).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from opd_exp.core.protocols import Learner, Objective, PolicyView
from opd_exp.core.types import StepBatch, micro_slices
from opd_exp.engines.hf_policy import HFPolicy


@torch.no_grad()
def batch_logprobs(policy: PolicyView, batch: StepBatch, temperature: float,
                   micro: int) -> torch.Tensor:
    """log p(y_t) of every response token, `micro` sequences at a time: [B, T]."""
    return torch.cat([policy.token_logprobs(batch.rollouts.select(s), temperature)
                      for s in micro_slices(batch.rollouts.size, micro)])


def make_optimizer(params, c) -> torch.optim.Optimizer:
    """AdamW from `learner.*` (a torch optimizer for every backend: DeepSpeed compiles none)."""
    return torch.optim.AdamW(list(params), lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay)


@dataclass(frozen=True)
class Phases:
    """A cold start's share of the schedule, in optimizer steps (SPEC §2; the authors' recipe: a
    full SFT with its own rate, warm-up and cosine decay, then OPD from a fresh optimizer):
    `cold_steps` steps at `cold_lr`, warmed up linearly over `cold_warmup` and then `cold_decay`
    (cosine towards 0, or constant); after them the objective, its warm-up (`learner.warmup_steps`)
    counted from the switch; `reset`: AdamW's moments cleared at the switch."""
    cold_steps: int = 0
    cold_lr: float = 0.0
    cold_warmup: int = 0
    cold_decay: str = "cosine"
    reset: bool = False


def cold_start_phases(cfg) -> Phases:
    """`Phases` from `schedule.*` (none without a cold start). A skipped cold-start step
    (non-finite gradient) moves the switch of the schedule and the reset one step later."""
    sc = cfg.schedule
    if sc.name != "cold_start":
        return Phases()
    steps = sc.cold_start_steps  # one optimizer step each (validate: learner.minibatches = 1)
    return Phases(steps, sc.cold_start_lr if sc.cold_start_lr is not None else cfg.learner.lr,
                  math.ceil(round(sc.cold_start_warmup_ratio * steps, 9)), sc.cold_start_decay,
                  sc.reset_optimizer)


def make_scheduler(optimizer, c, phases: Phases = Phases()) -> torch.optim.lr_scheduler.LRScheduler:
    """The rate of optimizer step s (0-based) as a factor of `learner.lr`: a cold start's phase
    first (`Phases`), then linear warm-up over `learner.warmup_steps` steps, then constant. A
    skipped step (non-finite gradient) does not advance it."""
    def warm(s: int, steps: int) -> float:
        return min(1.0, (s + 1) / steps) if steps else 1.0

    def factor(s: int) -> float:
        if s < phases.cold_steps:  # warm-up, then the decay over the steps after it
            w, n = phases.cold_warmup, phases.cold_steps
            if s < w:
                return phases.cold_lr / c.lr * (s + 1) / w
            decay = 0.5 * (1 + math.cos(math.pi * (s - w) / (n - w))) if phases.cold_decay == "cosine" else 1.0
            return phases.cold_lr / c.lr * decay
        return warm(s - phases.cold_steps, c.warmup_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def minibatch_updates(batch: StepBatch, objective: Objective, c, policy: PolicyView,
                      backward: Callable, optimizer_step: Callable[[], float],
                      token_count: Callable[[float], float], rate: Callable[[], float]) -> dict[str, float]:
    """`learner.minibatches` optimizer steps over disjoint slices of the batch, each accumulated
    over micro-batches of `learner.micro_batch_size` sequences. The loss of a micro-batch is
    normalised by `token_count(tokens of the minibatch)`, so the accumulated gradient is the
    minibatch's token mean. Metrics are token-weighted over micro-batches and averaged over
    minibatches; `optimizer_step` returns the gradient norm before clipping, and must leave the
    weights untouched when it is not finite (counted in `skipped_steps`; `grad_norm_max` is then
    NaN or inf too, never hidden). `lr`: the mean of the rates the optimizer steps applied
    (`rate()` read before each)."""
    B = batch.rollouts.size
    totals: dict[str, float] = defaultdict(float)
    norms = []
    for mini in micro_slices(B, B // c.minibatches):
        mb_all = batch.select(mini)
        totals["lr"] += rate() / c.minibatches  # the rate this minibatch's optimizer step applies
        n_tokens = token_count(mb_all.mask_B_T.sum().clamp(min=1).item())
        for s in micro_slices(mb_all.rollouts.size, c.micro_batch_size):
            loss, m = objective.loss(policy, mb_all.select(s), n_tokens)
            backward(loss)
            for k, v in m.items():
                totals[k] += v / c.minibatches
        grad_norm = optimizer_step()
        norms.append(grad_norm)
        totals["grad_norm"] += grad_norm / c.minibatches
    totals["grad_norm_max"] = max(norms, key=lambda x: (math.isnan(x), x))  # NaN counts as largest
    totals["skipped_steps"] = float(sum(not math.isfinite(x) for x in norms))
    return dict(totals)


def prepare_for_training(model: torch.nn.Module, c) -> None:
    """Training mode, and `learner.gradient_checkpointing` switched on through the model's own
    HF API (non-reentrant checkpoints: correct under no_grad, with frozen inputs and ZeRO)."""
    if c.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"learner.gradient_checkpointing=true is not allowed for "
                             f"{type(model).__name__}: the model does not support it")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()


class TorchLearner:
    """AdamW with linear warm-up then a constant learning rate; global-norm gradient clipping.

    `train/grad_norm` is the total gradient norm before clipping. A non-finite norm (a NaN or inf
    loss or gradient) skips the optimizer and scheduler step: it never reaches the weights.
    """

    def __init__(self, model: torch.nn.Module, learner_cfg, vocab_size: int | None = None,
                 phases: Phases = Phases()):
        """`vocab_size`: the tokenizer's real tokens (padded rows take part in no objective);
        `phases`: a cold start's schedule (`cold_start_phases`)."""
        self.model = self.policy = model
        self.view = HFPolicy(model, vocab_size=vocab_size, packing=learner_cfg.packing)
        self.cfg = learner_cfg
        self.optimizer = make_optimizer((p for p in model.parameters() if p.requires_grad), self.cfg)
        self.scheduler, self.phases = make_scheduler(self.optimizer, self.cfg, phases), phases
        prepare_for_training(model, self.cfg)

    def logprobs(self, batch: StepBatch, temperature: float) -> torch.Tensor:
        return batch_logprobs(self.view, batch, temperature, self.cfg.micro_batch_size)

    def update(self, batch: StepBatch, objective: Objective) -> dict[str, float]:
        def optimizer_step() -> float:
            params = [p for p in self.model.parameters() if p.grad is not None]
            max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
            if math.isfinite(grad_norm):
                self.optimizer.step()
                self.scheduler.step()
                if self.phases.reset and self.scheduler.last_epoch == self.phases.cold_steps:
                    self.optimizer.state.clear()  # the cold start's last step: OPD from fresh moments
            self.optimizer.zero_grad(set_to_none=True)
            return grad_norm

        self.optimizer.zero_grad(set_to_none=True)
        totals = minibatch_updates(batch, objective, self.cfg, self.view,
                                   backward=lambda loss: loss.backward(),
                                   optimizer_step=optimizer_step, token_count=lambda n: n,
                                   rate=lambda: self.optimizer.param_groups[0]["lr"])
        return totals

    def save(self, directory: Path) -> None:
        torch.save({"optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict()}, directory / "learner.pt")

    def load(self, directory: Path) -> None:
        state = torch.load(directory / "learner.pt", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def make(cfg, model, dist, run_dir: Path | None = None, vocab_size: int | None = None) -> Learner:
    return TorchLearner(model, cfg.learner, vocab_size, cold_start_phases(cfg))
