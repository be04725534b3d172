"""Peak RSS of one micro-batch's loss forward + backward against the memory plan's activations,
LM-head chunks and gradients (a random Qwen3, 2 × 2,048 tokens, float32, on the CPU):

    MALLOC_MMAP_THRESHOLD_=65536 python -m tests.engines.rss_probe CHECKPOINTING(0|1)   → one JSON line

glibc's mmap threshold is fixed so that freed tensors leave the process (RSS then tracks what is
allocated); VmHWM is reset after a warm-up pass (/proc/self/clear_refs)."""

import gc
import json
import sys

import torch

from opd_exp.config import schema_cfg
from opd_exp.core.types import Rollouts, StepBatch, TeacherScores
from opd_exp.engines.hf_policy import HFPolicy
from opd_exp.methods import make_objective
from opd_exp.runtime.memory_plan import activations, shape_from_config
from tests.test_memory_plan import qwen


def status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def main(checkpointing: bool) -> dict:
    torch.set_num_threads(2)
    m = qwen(H=512, I=1536, L=4, heads=8, kv=4, hd=64, V=8192, tied=True)
    m.train()
    if checkpointing:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rows, P, T = 2, 512, 1536
    g = torch.Generator().manual_seed(0)
    r = Rollouts(prompt_ids_B_P=torch.randint(0, 8192, (rows, P), generator=g), prompt_mask_B_P=torch.ones(rows, P),
                 response_ids_B_T=torch.randint(0, 8192, (rows, T), generator=g),
                 response_mask_B_T=torch.ones(rows, T), group_B=torch.arange(rows))
    cfg = schema_cfg({"learner": {"micro_batch_size": rows, "gradient_checkpointing": checkpointing},
                      "rollout": {"max_new_tokens": T}, "plan": {"prompt_tokens": P}})
    obj = make_objective(cfg.objective, cfg.reward, 1.0)
    view = HFPolicy(m)
    batch = StepBatch(r, TeacherScores(logp_B_T=torch.zeros(rows, T)))
    with torch.no_grad():
        batch.logp_old_B_T = view.token_logprobs(r)
    batch, _ = obj.prepare(batch)

    def step():
        loss, _ = obj.loss(view, batch, float(rows * T))
        loss.backward()

    step()  # warm-up: kernels, the allocator's first blocks
    m.zero_grad(set_to_none=True)
    gc.collect()
    base = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    step()
    peak = status("VmHWM") - base
    grads = sum(p.grad.numel() * p.grad.element_size() for p in m.parameters())
    plan = sum(activations(cfg, shape_from_config("probe", m.config.to_dict()), False).values()) + grads
    return {"peak": peak, "plan": plan, "ratio": plan / peak}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1] == "1")))
