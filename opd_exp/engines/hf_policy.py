"""The HF model behind the `PolicyView` that objectives differentiate (opd_exp/core/protocols.py).

This module knows how a `transformers` causal LM is called for scoring: `logits_to_keep`, the
backbone (`base_model`) and the output embeddings. Objectives, learners and the HF teacher get
log-probs, hidden states and the LM head from here, never from the model.
"""

from __future__ import annotations

import weakref

import torch

from opd_exp.config import ConfigError
from opd_exp.core.types import Rollouts, micro_slices
from opd_exp.engines.packing import pack
from opd_exp.methods.common import upcast
from opd_exp.methods.head_logprobs import chunk_positions, head_token_logprobs


def token_logprobs(model: torch.nn.Module, r: Rollouts, temperature: float = 1.0,
                   vocab_size: int | None = None, packing: bool = False,
                   head_alone: bool = False) -> torch.Tensor:
    """log softmax(logits / temperature) of each response token under `model`: [B, T], over the
    first `vocab_size` logits (the tokenizer's real tokens; None = all rows).

    `head_alone` (or `packing`): the backbone's final hidden states, then the LM head a chunk of
    positions at a time (opd_exp/methods/head_logprobs.py: never [B, T, V], in forward or
    backward); `model` is the HF module, and with `packing` its backbone sees the real tokens only
    (opd_exp/engines/packing.py). Else the model's whole forward (a wrapper whose forward
    takes the HF keywords, e.g. a DeepSpeed engine, or a model that post-processes its logits),
    with only the T + 1 last positions through the LM head (HF `logits_to_keep`; the last is
    dropped: it predicts the token after the response).
    """
    T = r.response_ids_B_T.shape[1]
    if packing or head_alone:
        # the head at the response's own N positions only, as one row (not the B × T of the
        # padded batch: at V = 151,936 the head's matmul is most of a sampled-token score)
        hidden_B_T_H, at_B_T = response_hidden(model, r, packing), r.response_mask_B_T != 0
        logp_1_N = head_token_logprobs(hidden_B_T_H[at_B_T][None], model.get_output_embeddings(),
                                       r.response_ids_B_T[at_B_T][None], temperature, vocab_size)
        logp_B_T = logp_1_N.new_zeros(at_B_T.shape).index_put((at_B_T,), logp_1_N[0])
        return logp_B_T * r.response_mask_B_T
    logits_B_T_V = model(input_ids=r.input_ids_B_L, attention_mask=r.attention_mask_B_L,
                         position_ids=r.position_ids_B_L, logits_to_keep=T + 1,
                         use_cache=False).logits[:, :-1, :vocab_size]
    logits_B_T_V = upcast(logits_B_T_V)
    if temperature != 1.0:
        logits_B_T_V = logits_B_T_V / temperature
    picked_B_T = logits_B_T_V.gather(-1, r.response_ids_B_T[..., None])[..., 0]
    return (picked_B_T - torch.logsumexp(logits_B_T_V, -1)) * r.response_mask_B_T


def response_hidden(model: torch.nn.Module, r: Rollouts, packing: bool = False) -> torch.Tensor:
    """Final hidden states at the positions that predict the response tokens: [B, T, H]
    (the LM head is applied later, a chunk of positions at a time)."""
    if packing:
        p = pack(r)
        return p.unpack(model.base_model(input_ids=p.input_ids_R_N, position_ids=p.position_ids_R_N,
                                         use_cache=False).last_hidden_state)
    out = model.base_model(input_ids=r.input_ids_B_L, attention_mask=r.attention_mask_B_L,
                           position_ids=r.position_ids_B_L, use_cache=False)
    return out.last_hidden_state[:, r.prompt_ids_B_P.shape[1] - 1:-1]


# attention implementations that read packed sequences' boundaries from the position ids with
# attention_mask=None (transformers' packed-sequence mask); flash-attention needs one row
PACKED_ATTENTION = ("sdpa", "eager", "flex_attention")


# config keys of models whose forward changes the LM head's logits (Gemma 2/3 soft-capping,
# Cohere's scale, Granite's divisor, Falcon-H1's multiplier), with the value that changes nothing:
# refused at once where the head is applied alone; any other change (remote code, a head with a
# bias) is found by `head_alone_check` on the first rows scored
LOGIT_POSTPROCESSING = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0,
                        "lm_head_multiplier": 1.0}


def logit_postprocessing(config) -> dict:
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {k: getattr(config, k) for k, neutral in LOGIT_POSTPROCESSING.items()
            if getattr(config, k, neutral) not in (neutral, None)}


_VERDICTS: "weakref.WeakKeyDictionary[torch.nn.Module, str | None]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def head_alone_check(model: torch.nn.Module, forward: torch.nn.Module, r: Rollouts) -> str | None:
    """None if, on row 0 of `r`, `forward`'s logits are the bias-free LM head's weight applied to
    the backbone's final hidden states, and the backbone called alone (as `response_hidden`
    calls it) gives those hidden states — what opd_exp computes when it applies the head alone;
    else what the model does besides. Up to a few roundings of the logits' dtype (other kernels
    may run): soft-capping, scales and other heads are far outside that. One verdict per module."""
    if model in _VERDICTS:
        return _VERDICTS[model]
    head, post = model.get_output_embeddings(), logit_postprocessing(model.config)
    if post:
        verdict = f"its forward post-processes its logits ({post})"
    elif not isinstance(head, torch.nn.Linear) or head.bias is not None:
        verdict = "its LM head is not a Linear without bias"
    elif model.base_model is model:
        verdict = "it has no backbone module apart from its head"
    else:
        verdict = _compare(model, forward, head.weight, r.select(slice(0, 1)))
    _VERDICTS[model] = verdict
    return verdict


def _compare(model, forward, W: torch.Tensor, one: Rollouts) -> str | None:
    seen = {}

    def backbone_hook(module, args, out) -> None:  # returns None: the output stays as it is
        hidden = out[0] if isinstance(out, tuple) else getattr(out, "last_hidden_state", None)
        if "hidden" not in seen and torch.is_tensor(hidden):
            seen["hidden"] = hidden.clone()  # before anything after the backbone can change it

    hook = model.base_model.register_forward_hook(backbone_hook)
    try:
        logits = forward(input_ids=one.input_ids_B_L, attention_mask=one.attention_mask_B_L,
                         position_ids=one.position_ids_B_L, logits_to_keep=one.response_ids_B_T.shape[1] + 1,
                         use_cache=False).logits
    finally:
        hook.remove()
    if "hidden" not in seen:
        return "its forward does not run its backbone"
    hidden = seen["hidden"]

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        tol = 8 * torch.finfo(a.dtype).eps * b.abs().max().clamp(min=1)
        return a.shape == b.shape and bool(((a - b).abs() <= tol).all())
    if not close(logits, torch.nn.functional.linear(hidden[:, -logits.shape[1]:], W)):
        return "its logits are not its LM head on its backbone's final hidden states"
    P = one.prompt_ids_B_P.shape[1]
    if not close(response_hidden(model, one), hidden[:, P - 1:-1]):
        return "its backbone called alone gives other hidden states than inside its forward"
    return None


def refuse(model: torch.nn.Module, what: str, why: str | None) -> None:
    """ConfigError: `what` needs the LM head applied alone, which `model` does not allow (`why`)."""
    if why:
        name = getattr(model.config, "_name_or_path", "") or type(model).__name__
        raise ConfigError(f"{what} is not allowed with {name!r}: {why}; opd_exp applies the LM "
                          "head alone there — use the sampled-token objective without packing")


def refuse_unless_head_alone(model: torch.nn.Module, what: str) -> None:
    """At start-up, before any step: `head_alone_check` on a short row of token ids 1..4."""
    ids = torch.arange(1, 5, device=next(model.parameters()).device)[None]
    one = Rollouts(prompt_ids_B_P=ids, prompt_mask_B_P=torch.ones_like(ids), response_ids_B_T=ids,
                   response_mask_B_T=torch.ones_like(ids, dtype=torch.float), group_B=ids.new_zeros(1))
    refuse(model, what, head_alone_check(model, model, one))


class HFPolicy:
    """`PolicyView` of an HF causal LM. `forward` is what runs the whole model (the model, or the
    DeepSpeed engine wrapping it, so ZeRO sees the forward); `model` the HF module itself.
    `head_alone`: the sampled tokens' log-probs from the backbone and the LM head a chunk of
    positions at a time (no [B, T, V] logits) — unless the model's forward does more than its
    backbone then its head (`head_alone_check`, on the first rows scored): then from the whole
    forward, as with head_alone=False (DeepSpeed: its forward must run through the engine)."""

    def __init__(self, model: torch.nn.Module, forward: torch.nn.Module | None = None,
                 vocab_size: int | None = None, packing: bool = False,
                 packing_key: str = "learner.packing", head_alone: bool = True):
        self.model, self.forward = model, forward if forward is not None else model
        self.vocab_size, self.packing, self.packing_key = vocab_size, packing, packing_key
        attention = getattr(model.config, "_attn_implementation", None)
        if packing and attention not in PACKED_ATTENTION:
            raise ConfigError(f"{packing_key}=true is not allowed with attention {attention!r}: "
                              f"one of {', '.join(PACKED_ATTENTION)} (the packed rows' boundaries "
                              "come from the position ids)")
        self.postprocessing = logit_postprocessing(model.config)
        if packing:
            refuse(model, f"{packing_key}=true", str(self.postprocessing) if self.postprocessing else None)
        self.head_alone = head_alone and not self.postprocessing

    def _check(self, rollouts: Rollouts) -> str | None:
        """Why the head alone would not give the model's logits (None: it does; one verdict per
        module); no rows to check on: None, asked again with the next ones."""
        if rollouts.size and rollouts.response_ids_B_T.shape[1]:
            return head_alone_check(self.model, self.forward, rollouts)
        return None

    @property
    def lm_head(self) -> torch.nn.Module:  # used with response_hidden, which checks the model
        return self.model.get_output_embeddings()

    def token_logprobs(self, rollouts: Rollouts, temperature: float = 1.0) -> torch.Tensor:
        if self.packing:
            refuse(self.model, f"{self.packing_key}=true", self._check(rollouts))
        elif self.head_alone and self._check(rollouts):
            self.head_alone = False  # the model's whole forward gives its log-probs
        # head alone or packed: the HF module itself (its backbone and head), as response_hidden
        alone = self.packing or self.head_alone
        return token_logprobs(self.model if alone else self.forward, rollouts, temperature,
                              self.vocab_size, self.packing, self.head_alone)

    def response_hidden(self, rollouts: Rollouts) -> torch.Tensor:
        refuse(self.model, "an objective, teacher score or diagnostic on the LM head alone", self._check(rollouts))
        return response_hidden(self.model, rollouts, self.packing)


@torch.no_grad()
def topk_and_entropy(view: HFPolicy, r: Rollouts, k: int, micro_batch_size: int, chunk: int = 64,
                     temperature: float = 1.0
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-probs [B, T, k] under the full softmax, their token ids [B, T, k], the entropy [B, T],
    the log-prob of each response token [B, T]) of the policy's next-token distribution at each
    response position; `micro_batch_size` rows and `chunk` positions through the LM head at a time
    (never [B, T, V] at once), padded embedding rows excluded."""
    B, T = r.response_ids_B_T.shape
    if B == 0 or T == 0:
        empty = r.response_ids_B_T.new_zeros(B, T, k)
        zeros = r.response_ids_B_T.new_zeros(B, T).float()
        return empty.float(), empty, zeros, zeros
    vals, ids, ents, picked = [], [], [], []
    chunk = chunk_positions(min(B, micro_batch_size), view.vocab_size or getattr(view.lm_head, "out_features", 0),
                            chunk)
    for s in micro_slices(r.size, micro_batch_size):
        hidden = view.response_hidden(r.select(s))
        for c in range(0, hidden.shape[1], chunk):
            logits = upcast(view.lm_head(hidden[:, c:c + chunk])[..., :view.vocab_size])
            logp = torch.log_softmax(logits / temperature if temperature != 1.0 else logits, -1)
            v, i = logp.topk(k, dim=-1)
            vals.append(v)
            ids.append(i)
            ents.append(-(logp.exp() * logp).nan_to_num().sum(-1))
            picked.append(logp.gather(-1, r.response_ids_B_T[s, c:c + chunk, None])[..., 0])
    n_chunks = -(-T // chunk)

    def stack(parts: list[torch.Tensor]) -> torch.Tensor:  # chunks along T, micro-batches along B
        rows = [torch.cat(parts[i:i + n_chunks], 1) for i in range(0, len(parts), n_chunks)]
        return torch.cat(rows)
    return stack(vals), stack(ids), stack(ents), stack(picked) * r.response_mask_B_T
