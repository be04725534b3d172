"""Loading the teacher/student pair: one code path for hub ids, local folders and the toy world."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig,
                          PreTrainedModel)

from opd_exp import toyworld
from opd_exp.config import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_path(path: str) -> str:
    """`toy:<name>` → the toy world's folder; anything else is passed to from_pretrained as is."""
    if path.startswith("toy:"):
        return str(toyworld.model_dir(path.removeprefix("toy:")))
    return path


def _load(what: str, field: str, fn, path: str, **kw):
    try:
        return fn(resolve_path(path), **kw)
    except (OSError, ValueError) as e:  # missing folder, unknown hub id, no network
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{field}={path!r}: could not load the {what}: {first}") from e


def load_model(mcfg, field: str) -> PreTrainedModel:
    """`field` names the config node (e.g. pair.student) for error messages."""
    return _load("model", f"{field}.path", AutoModelForCausalLM.from_pretrained, mcfg.path,
                 dtype=DTYPES[mcfg.dtype], revision=mcfg.revision,
                 trust_remote_code=mcfg.trust_remote_code)


def load_tokenizer(mcfg, field: str):
    tok = _load("tokenizer", f"{field}.path", AutoTokenizer.from_pretrained, mcfg.path,
                revision=mcfg.revision, trust_remote_code=mcfg.trust_remote_code,
                padding_side="left")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def check_same_vocab(student_tok, teacher_tok, mask_unshared: bool = False) -> list[int]:
    """Token-level OPD compares the two models token by token: their vocabularies must agree.
    With `mask_unshared` (objective.mask_unshared) a mismatch is allowed and the student token
    ids that mean something else, or nothing, to the teacher's tokenizer are returned (they are
    never trained on); otherwise it is an error."""
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv == tv:
        return []
    if not mask_unshared:
        diff = len(set(sv.items()) ^ set(tv.items()))
        raise ConfigError(f"pair: student and teacher tokenizers differ ({diff} token/id pairs "
                          "not shared); token-level distillation needs one vocabulary (or "
                          "objective.mask_unshared=true: never train on the ids not shared)")
    teacher_token = {i: t for t, i in tv.items()}
    return sorted(i for t, i in sv.items() if teacher_token.get(i) != t)


def model_shape(mcfg, field: str) -> tuple[int, int | None]:
    """(rows of the LM head = the config's vocab_size, context length or None), read from the
    model's config without loading weights."""
    c = _load("config", f"{field}.path", AutoConfig.from_pretrained, mcfg.path,
              revision=mcfg.revision, trust_remote_code=mcfg.trust_remote_code)
    text = c if getattr(c, "vocab_size", None) else c.get_text_config()
    return text.vocab_size, getattr(text, "max_position_embeddings", None)


def check_vocab_sizes(tokenizer, rows: dict[str, int]) -> tuple[int, str | None]:
    """(V, note): V = the tokenizer's real vocabulary, which every objective, support and top-K
    works on. Models may have more embedding rows than tokens (padding: R1-Distill-Qwen-1.5B
    151,936, -7B 152,064 for 151,665 tokens); those rows are never tokens. Fewer rows than tokens
    is an error. `note` says what was padded, if anything."""
    V = len(tokenizer)
    for field, n in rows.items():
        if n < V:
            raise ConfigError(f"{field}.path: the model has {n} output rows but the pair's "
                              f"tokenizer {V} tokens; they must cover its vocabulary")
    padded = {f: n for f, n in rows.items() if n > V}
    note = None if not padded else ("vocabulary: " + ", ".join(
        f"{f} {n} rows" for f, n in rows.items()) + f" for {V} tokens: padded rows take part in "
        "no objective, support or top-K")
    return V, note


def stop_token_ids(mcfg, tokenizer) -> set[int]:
    """The model's end tokens: its generation_config's eos_token_id(s) and its tokenizer's eos.
    A run stops rollouts at the union over both models: a Base student ends with <|endoftext|>
    only, its instruct teacher's turn with <|im_end|>."""
    try:
        ids = GenerationConfig.from_pretrained(resolve_path(mcfg.path), revision=mcfg.revision).eos_token_id
    except OSError:  # no generation_config.json: the model config's eos, as HF derives it
        c = AutoConfig.from_pretrained(resolve_path(mcfg.path), revision=mcfg.revision,
                                       trust_remote_code=mcfg.trust_remote_code)
        ids = getattr(c, "eos_token_id", None) or getattr(c.get_text_config(), "eos_token_id", None)
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def save_model(model: PreTrainedModel, tokenizer, out: Path) -> None:
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
