"""A toy model trained on a reduced vocabulary, lifted to a real vocabulary's embedding rows with
the same distribution (issue 24).

The small model's vocabulary is the real tokenizer's ids the task uses (`real_ids`, in the small
model's order) plus one class, index `other`, standing for every other row of the real model. It
is trained with + log(N_other) added to that class's logit (`other_offset`), N_other = the real
rows it stands for. Lifting writes each task token's row at its real id and the `other` row at
every other real row (padded rows included). With tied (or lifted) output rows the real model's
logits are the small model's at the task ids and h·e_other at each of the N_other rows, so

    p_real(v) = p_small(v)                      for every task token v,
    Σ_{u other} p_real(u) = N_other · e^{h·e_other} / Z = p_small(other)

exactly: the real-size softmax is the trained one, and the mass outside the task's tokens is
what the small model put on `other` (measured, never assumed).
"""

from __future__ import annotations

import copy
import math

import torch
from transformers import PreTrainedModel


def other_offset(rows: int, n_task: int) -> float:
    """log(N_other): the logit offset of the `other` class while the small model trains."""
    n_other = rows - n_task
    if n_other < 1:
        raise ValueError(f"rows ({rows}) must exceed the task's tokens ({n_task})")
    return math.log(n_other)


TOKEN_ID_KEYS = ("eos_token_id", "pad_token_id", "bos_token_id")


def real_id(ids, real_ids: list[int], other: int, key: str):
    """A config's token id (or list of ids) of the small vocabulary, as the real vocabulary's."""
    if ids is None:
        return None
    many = isinstance(ids, (list, tuple))
    out = []
    for i in (ids if many else [ids]):
        if i == other or not 0 <= i < len(real_ids):
            raise ValueError(f"{key}={i}: not a task token of the small vocabulary")
        out.append(real_ids[i])
    return out if many else out[0]


def lift(small: PreTrainedModel, real_ids: list[int], other: int, rows: int) -> PreTrainedModel:
    """The real-size copy of `small` (same class and config but `vocab_size=rows`).

    `real_ids[i]` is the real id of the small model's token i, for every i but `other` (whose
    entry is ignored); the task's real ids must be distinct and < rows."""
    vocab = small.get_input_embeddings().weight.shape[0]
    if len(real_ids) != vocab or not 0 <= other < vocab:
        raise ValueError(f"real_ids must map all {vocab} small ids, and other be one of them")
    task = torch.tensor([r for i, r in enumerate(real_ids) if i != other])
    small_idx = torch.tensor([i for i in range(vocab) if i != other])
    if len(set(task.tolist())) != len(task) or int(task.max()) >= rows or int(task.min()) < 0:
        raise ValueError(f"the task's real ids must be distinct and in 0..{rows - 1}")
    config = copy.deepcopy(small.config)
    config.vocab_size = rows
    for key in TOKEN_ID_KEYS:  # eos / pad / bos: ids of the small vocabulary, mapped
        setattr(config, key, real_id(getattr(config, key, None), real_ids, other, key))
    big = type(small)(config).to(small.dtype)
    gen = copy.deepcopy(small.generation_config)
    for key in TOKEN_ID_KEYS:
        setattr(gen, key, real_id(getattr(gen, key, None), real_ids, other, f"generation_config.{key}"))
    big.generation_config = gen
    state = small.state_dict()
    with torch.no_grad():
        tables = (small.get_input_embeddings(), small.get_output_embeddings())
        for src, dst in zip(tables, (big.get_input_embeddings(), big.get_output_embeddings())):
            dst.weight.copy_(src.weight[other].expand_as(dst.weight))
            dst.weight[task] = src.weight[small_idx]
        skip = {f"{n}.weight" for n, m in small.named_modules() if any(m is t for t in tables)}
        result = big.load_state_dict({k: v for k, v in state.items() if k not in skip}, strict=False)
    if set(result.missing_keys) - skip or result.unexpected_keys:
        raise RuntimeError("lift: weights not carried over: "
                           f"{sorted(set(result.missing_keys) - skip) + result.unexpected_keys}")
    if config.tie_word_embeddings:
        big.tie_weights()
    return big.eval()
