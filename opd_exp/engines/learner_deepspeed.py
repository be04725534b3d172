"""DeepSpeed ZeRO learner (`learner=deepspeed`): data parallel over the launcher's ranks.

Each rank trains on its shard of the step's rollouts. DeepSpeed averages gradients over the W
ranks, so each rank normalises its loss by (all ranks' response tokens) / W: the applied gradient
is then the token mean over the whole step's batch, as in one process (docs/distributed.md).

The ZeRO JSON is generated from `learner.*` (`zero_stage`, `precision`, `offload_optimizer`,
`max_grad_norm`) unless `learner.deepspeed_config` names a file of your own, whose keys win; the
batch keys are always set by the loop (it owns the micro-batching). The optimizer is a torch
AdamW (`learner.lr`, `betas`, `weight_decay`, warm-up) unless the JSON declares one, so no
DeepSpeed op needs compiling. The effective JSON is written to `<run>/deepspeed_config.json`.

ZeRO-3 partitions the weights: every rank keeps one whole inference copy of the student
(`policy`, refreshed after each update) for its rollout engine and for the HF checkpoint.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import deepspeed
import torch

from opd_exp.config import sequences_per_rank
from opd_exp.core.protocols import Learner, Objective
from opd_exp.core.ranks import Dist
from opd_exp.core.types import StepBatch
from opd_exp.engines.hf_policy import HFPolicy
from opd_exp.engines.learner_torch import (batch_logprobs, make_optimizer, make_scheduler,
                                           minibatch_updates, prepare_for_training)


def micro_batches_per_step(lc, sequences: int) -> int:
    """Micro-batches per optimizer step on each rank (DeepSpeed's gradient_accumulation_steps);
    `sequences`: the rollouts this rank trains on per step."""
    return math.ceil(sequences // lc.minibatches / lc.micro_batch_size)


def deepspeed_config(lc, world_size: int, sequences: int) -> dict:
    """The effective ZeRO JSON from `learner.*` (a user JSON's keys win; the batch keys are ours)."""
    zero: dict = {"stage": lc.zero_stage}  # a user JSON's zero_optimization replaces it whole
    if lc.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    generated = {
        "zero_optimization": zero,
        "bf16": {"enabled": lc.precision == "bf16"},
        "gradient_clipping": max(lc.max_grad_norm, 0.0),  # 0 = no clipping
        "zero_allow_untested_optimizer": True,  # a torch AdamW under ZeRO
        "zero_force_ds_cpu_optimizer": False,  # … also with offload (no cpu_adam to compile)
        "steps_per_print": 10**9,
    }
    user = json.loads(Path(lc.deepspeed_config).read_text()) if lc.deepspeed_config else {}
    gas = micro_batches_per_step(lc, sequences)
    owned = {"train_micro_batch_size_per_gpu": lc.micro_batch_size,
             "gradient_accumulation_steps": gas,
             "train_batch_size": lc.micro_batch_size * gas * world_size}
    return {**generated, **user, **owned}


class DeepSpeedLearner:
    """`train/grad_norm` is DeepSpeed's global gradient norm (all ranks) before clipping."""

    def __init__(self, model: torch.nn.Module, learner_cfg, dist: Dist, sequences: int,
                 run_dir: Path | None = None, policy_on_cpu: bool = False,
                 vocab_size: int | None = None):
        """`sequences`: rollouts this rank trains on per step; `policy_on_cpu`: keep the ZeRO-3
        inference copy on the CPU (a rollout engine that only reads it from disk)."""
        self.cfg, self.dist = learner_cfg, dist
        self.ds_config = deepspeed_config(learner_cfg, dist.world_size, sequences)
        self.stage3 = self.ds_config["zero_optimization"].get("stage", 0) == 3
        if run_dir is not None and dist.is_main:
            (run_dir / "deepspeed_config.json").write_text(json.dumps(self.ds_config, indent=2))
        if torch.distributed.is_initialized():
            deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
        # ZeRO-3: a whole copy for sampling, taken before DeepSpeed partitions the module
        policy = copy.deepcopy(model).eval() if self.stage3 else None
        if policy is not None and policy_on_cpu:
            policy.to("cpu")  # only written to disk for the engine
        prepare_for_training(model, learner_cfg)
        c = self.cfg
        self.engine, *_ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=None if "optimizer" in self.ds_config else (lambda ps: make_optimizer(ps, c)),
            lr_scheduler=None if "scheduler" in self.ds_config else (lambda o: make_scheduler(o, c)),
            config=self.ds_config)
        self.model = self.engine.module
        self.policy = policy if policy is not None else self.model
        # ZeRO-3: the forward runs through the engine, which gathers the partitioned weights and
        # opens its backward (calling the module itself broke accumulation: step-1 grad norm
        # 0.068 instead of 0.162) — so the sampled tokens' log-probs come from the whole forward.
        # ZeRO-1/2 hold whole weights: the backbone, then the head a chunk of positions at a time
        # (no [B, T, V] logits), as the torch learner — tested against it (tests/test_deepspeed.py)
        self.view = HFPolicy(self.model, forward=self.engine, vocab_size=vocab_size,
                             packing=self.cfg.packing, head_alone=not self.stage3)

    def logprobs(self, batch: StepBatch, temperature: float) -> torch.Tensor:
        return batch_logprobs(self.view, batch, temperature, self.cfg.micro_batch_size)

    def update(self, batch: StepBatch, objective: Objective) -> dict[str, float]:
        W = self.dist.world_size

        def backward(loss: torch.Tensor) -> None:
            self.engine.backward(loss, scale_wrt_gas=False)  # the loss is already a token mean
            self.engine.step()  # applies the update at the accumulation boundary only

        def optimizer_step() -> float:  # DeepSpeed stepped at the boundary micro-batch
            norm = self.engine.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")

        totals = minibatch_updates(batch, objective, self.cfg, self.view, backward=backward,
                                   optimizer_step=optimizer_step,
                                   token_count=lambda n: self.dist.sum(n) / W,
                                   rate=lambda: self.engine.get_lr()[0])
        if self.stage3:
            self._refresh_policy()
        return totals

    @torch.no_grad()
    def _refresh_policy(self) -> None:
        """Gather each partitioned parameter in turn (collective: all ranks) into the copy."""
        for p, q in zip(self.model.parameters(), self.policy.parameters()):
            with deepspeed.zero.GatheredParameters([p]):
                q.copy_(p.detach().to(q.device, q.dtype))

    def save(self, directory: Path) -> None:
        """Collective: every rank writes its ZeRO shard under `directory/deepspeed/`."""
        self.engine.save_checkpoint(str(directory / "deepspeed"), tag="state")

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory / "deepspeed"), tag="state")
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory / 'deepspeed'}")
        if self.stage3:
            self._refresh_policy()


def make(cfg, model, dist: Dist, run_dir: Path | None = None, vocab_size: int | None = None) -> Learner:
    return DeepSpeedLearner(model, cfg.learner, dist, sequences_per_rank(cfg, dist.world_size),
                            run_dir, policy_on_cpu=cfg.rollout.backend != "hf", vocab_size=vocab_size)
