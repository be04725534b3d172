"""One-step-off-policy rollouts (`rollout.max_staleness=1`): step t+1's rollouts are sampled in a
background thread while step t is scored and trained.

    step t:   rollouts_t ← the sampling started during step t−1, from W_{t−1}     (staleness 1)
              the sampler takes W_t (the learner's weights before update t) and starts sampling
              step t+1's prompts in the background
              teacher scores rollouts_t; learner update t → W_{t+1}            (overlaps the sampling)

With `rollout.score_ahead=true` the background job goes on to score what it sampled —
special-token masking and the teacher (loop/step.py `score`) — so step t+1 finds its rollouts
scored and the foreground is left the verifier (math-verify's timeouts need the main thread) and
the learner's work. The teacher's scores do not depend on the student's weights, and scoring
draws no random number.

W_t = the weights after t updates. The first step, the first after a resume and the first after a
cold start sample from W_t in the foreground (staleness 0). The sampled-token objective corrects
the lag with the truncated importance weight min(p_learner / π_sampler, rollout.is_cap) on every
token; the top-K and full-vocabulary objectives are exact on whatever states were visited, so
staleness only changes which states those are.

The sampler's weights are never changed while it samples: the learner's new weights are only
marked (`sync_weights`) and pushed when the sampler is next used, after the background sampling
has finished. An HF sampler shares the learner's tensors, so it gets a copy of the policy (one
more model in memory); vLLM engines hold their own copy already. The main thread draws no random
numbers while a background sampling runs (the step waits for it before seeding, evaluating or
running diagnostics), so a run is reproducible from its seed; a resumed run is not bit-identical
to an uninterrupted one (its first step samples in the foreground), which is why this is off by
default.
"""

from __future__ import annotations

import copy
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import torch

from opd_exp.core.protocols import RolloutBackend
from opd_exp.core.types import Rollouts, Sampling


class AheadSampler:
    """A `RolloutBackend` (for evaluation and anything else that samples in the foreground) that
    can also sample one step ahead in a background thread (`start` / `take`)."""

    def __init__(self, backend: RolloutBackend, policy: torch.nn.Module, shares_weights: bool,
                 threads: int | None = None):
        self.backend, self.policy = backend, policy
        self.copy = copy.deepcopy(policy).eval() if shares_weights else None
        if self.copy is not None:
            for p in self.copy.parameters():
                p.requires_grad_(False)
            backend.sync_weights(self.copy)
        self.stale = True  # the learner's weights are not yet the sampler's (pushed on first use)
        # `threads`: intra-op threads of the background thread (torch reads the count per OS
        # thread, so a new thread would take every core); None: left as it is (an in-process vLLM
        # engine's CPU kernels check that they run with the thread count it was set up with)
        init = {} if threads is None else {"initializer": torch.set_num_threads, "initargs": (threads,)}
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-ahead", **init)
        self.pending: tuple[int, list, Future] | None = None  # (step, its prompts, the sampling)
        self.sample_seconds = 0.0  # wall time of the last background sampling

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.policy, self.stale = model, True  # pushed when the sampler is next used

    def wait(self) -> None:
        """Until the background sampling (if any) has finished; its result is kept."""
        if self.pending is not None:
            self.pending[2].exception()  # waits; an error is raised by `take`

    def _push(self) -> None:
        self.wait()
        if not self.stale:
            return
        if self.copy is None:
            self.backend.sync_weights(self.policy)
        else:
            with torch.no_grad():
                for mine, theirs in zip(self.copy.parameters(), self.policy.parameters()):
                    mine.copy_(theirs)
        self.stale = False

    def generate(self, prompts: list[list[int]], sampling: Sampling) -> Rollouts:
        """In the foreground, from the learner's current weights."""
        self._push()
        return self.backend.generate(prompts, sampling)

    def take(self, step: int, prompts: list[list[int]]) -> Any:
        """Step `step`'s rollouts (or what `then` made of them) if they were started ahead for
        exactly these prompts, else None."""
        if self.pending is None:
            return None
        started, started_prompts, future = self.pending
        self.pending = None
        rollouts = future.result()  # waits; re-raises the sampler's error here
        return rollouts if started == step and started_prompts == prompts else None

    def start(self, step: int, prompts: list[list[int]], sampling: Sampling, seed: int,
              then: Callable[[Rollouts], Any] | None = None) -> None:
        """Sample step `step`'s rollouts in the background from the learner's current weights;
        `then`: run on them in the same background job (`take` returns its result)."""
        self._push()
        torch.manual_seed(seed)  # the background thread's draws start from the step's own seed

        def job():
            t = time.time()
            rollouts = self.backend.generate(prompts, sampling)
            self.sample_seconds = time.time() - t  # read after the job's result: `take`
            return then(rollouts) if then else rollouts
        self.pending = (step, prompts, self.pool.submit(job))

    def close(self) -> None:
        self.wait()
        self.pending = None
        self.pool.shutdown(wait=True)
