"""A NaN loss under the DeepSpeed learner never reaches the weights:

    python -m tests.engines.ds_nan_probe WORLD ZERO_STAGE PORT    (one process, prints JSON)
"""
import json
import os
import sys

import torch
import torch.distributed as tdist
from transformers import AutoModelForCausalLM
from opd_exp.core.ranks import Dist
from opd_exp.config import schema_cfg
from opd_exp.engines.learner_deepspeed import DeepSpeedLearner
from opd_exp.methods.sampled_token import SampledTokenOPD
from opd_exp.core.types import StepBatch, TeacherScores, Rollouts, left_pad, response_mask
world, stage, port = sys.argv[1], int(sys.argv[2]), sys.argv[3]
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
tdist.init_process_group("gloo")
model = AutoModelForCausalLM.from_pretrained(f"{world}/student")
cfg = schema_cfg({"learner": {"backend": "deepspeed", "micro_batch_size": 4, "zero_stage": stage}})
learner = DeepSpeedLearner(model, cfg.learner, Dist(0, 1, 0), sequences=4)
g = torch.Generator().manual_seed(0)
ids, mask = left_pad([[5, 6, 7], [8, 9], [5, 5, 5, 5], [7]], 0)
resp = torch.randint(5, 50, (4, 6), generator=g)
r = Rollouts(ids, mask, resp, response_mask(resp, {2}), torch.arange(4))
obj = SampledTokenOPD(cfg.objective, cfg.reward, 1.0)


class NaN:
    teacher_needs, needs_old_logp, temperature = "sampled", True, 1.0

    def prepare(self, b):
        return obj.prepare(b)

    def loss(self, p, mb, n):
        loss, m = obj.loss(p, mb, n)
        return loss * float("nan"), m



batch = StepBatch(r, TeacherScores(torch.randn(4, 6) - 3))
batch.logp_old_B_T = learner.logprobs(batch, 1.0)
batch, _ = obj.prepare(batch)
learner.update(batch, obj)  # a good step first: DeepSpeed's norm is set, then the NaN one
before = [p.detach().clone() for p in learner.policy.parameters()]
m = learner.update(batch, NaN())
same = all(torch.equal(a, b) for a, b in zip(before, learner.policy.parameters()))
finite = all(torch.isfinite(p).all() for p in learner.policy.parameters())
m2 = learner.update(batch, obj)
changed = any(not torch.equal(a, b) for a, b in zip(before, learner.policy.parameters()))
print(json.dumps({"skipped": m["skipped_steps"], "norm": m["grad_norm"], "same": same,
                  "finite": finite, "then_changed": changed, "skipped2": m2["skipped_steps"]}))
