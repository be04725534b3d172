"""The pair as one object: student and teacher(s), each with its tokenizer, rows and stop tokens,
and how the vocabularies relate — the first of the run's builders (loop/build.py).

    identical   one vocabulary (the teacher's rows may be padded past it): token-level OPD as is
    masked      the vocabularies differ and objective.mask_unshared=true: the ids that mean
                something else to the teacher are never trained on (the old way)
    different   another tokenizer: the teacher reads the student's response as bytes, in its own
                tokens and template (engines/teacher_xtok.py, methods/xtok.py)
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from opd_exp.config import ConfigError, registry, validate_vocab
from opd_exp.engines.hf_models import (check_same_vocab, check_vocab_sizes, load_tokenizer,
                                       model_shape, stop_token_ids)

RELATIONS = ("identical", "masked", "different")


@dataclass
class Pair:
    student_cfg: DictConfig  # pair.student, or the checkpoint's student on a resume
    tokenizer: object  # the student's
    teacher_tok: object
    relation: str  # RELATIONS
    unshared: list[int]  # relation "masked": student ids never trained on
    others: dict  # pair.teachers: name -> (model config, tokenizer)
    shapes: dict  # field -> (rows, context length or None)
    vocab: int  # the student tokenizer's tokens: every objective's V
    stop_ids: set[int]  # where the student's rollouts stop
    teacher_stop_ids: set[int]  # where the teacher's own samples stop (its tokens)
    note: str | None = None  # what start-up prints about the vocabularies

    @property
    def cross_tokenizer(self) -> bool:
        return self.relation == "different"


def vocab_relation(tokenizer, teacher_tok, mask_unshared: bool) -> str:
    """One of RELATIONS (see the module doc)."""
    if tokenizer.get_vocab() == teacher_tok.get_vocab():
        return "identical"
    return "masked" if mask_unshared else "different"


def load_pair(cfg: DictConfig, student_cfg: DictConfig) -> Pair:
    tokenizer = load_tokenizer(cfg.pair.student, "pair.student")
    teacher_tok = load_tokenizer(cfg.pair.teacher, "pair.teacher")
    relation = vocab_relation(tokenizer, teacher_tok, cfg.objective.mask_unshared)
    unshared = check_same_vocab(tokenizer, teacher_tok, True) if relation == "masked" else []
    others = {name: (mc, load_tokenizer(mc, f"pair.teachers.{name}")) for name, mc in cfg.pair.teachers.items()}
    for mc, tok in others.values():  # routed teachers share the student's vocabulary exactly
        check_same_vocab(tokenizer, tok)
    shapes = {"pair.student": model_shape(student_cfg, "pair.student"),
              "pair.teacher": model_shape(cfg.pair.teacher, "pair.teacher"),
              **{f"pair.teachers.{n}": model_shape(mc, f"pair.teachers.{n}") for n, (mc, _) in others.items()}}
    student_rows = {k: rows for k, (rows, _) in shapes.items() if k != "pair.teacher" or relation != "different"}
    vocab, note = check_vocab_sizes(tokenizer, student_rows)
    teacher_stops = stop_token_ids(cfg.pair.teacher, teacher_tok)
    if relation != "different" and cfg.xtok.loss != "lsm":
        raise ConfigError(f"xtok.loss={cfg.xtok.loss!r} is not allowed: the ULD ablations are for a "
                          "teacher whose tokenizer differs from the student's; this pair shares one "
                          "vocabulary: xtok.loss=lsm")
    if relation == "different":
        check_vocab_sizes(teacher_tok, {"pair.teacher": shapes["pair.teacher"][0]})
        check_cross_tokenizer(cfg)
        note = ((note + "; ") if note else "") + (
            f"pair: the teacher's tokenizer differs from the student's ({len(teacher_tok)} and "
            f"{vocab} tokens): the teacher scores chunks of the same bytes in its own tokens "
            f"(xtok.credit={cfg.xtok.credit})")
    validate_vocab(cfg, vocab)
    stop_ids = stop_token_ids(student_cfg, tokenizer) | {  # the teacher's, where they are shared
        i for mc, tok in [(cfg.pair.teacher, teacher_tok), *others.values()]
        for i in stop_token_ids(mc, tok) if relation != "different"
        and i < vocab and i not in unshared}
    return Pair(student_cfg, tokenizer, teacher_tok, relation, unshared, others, shapes, vocab,
                stop_ids, teacher_stops if relation == "different" else stop_ids, note)


def check_cross_tokenizer(cfg: DictConfig) -> None:
    """What a teacher with another tokenizer supports today: one line naming the field."""
    why = ("the teacher's tokenizer differs from the student's (cross-tokenizer OPD, "
           "docs/objectives.md); ")

    def refuse(field: str, allowed: str) -> None:
        raise ConfigError(f"{field}={OmegaConf.select(cfg, field)!r} is not allowed: {why}{allowed}")

    needs = registry.teacher_needs(cfg.objective)
    if cfg.objective.name == "topk" and needs != "topk":
        refuse("objective.support", "the teacher's top-K carried onto the student's ids: "
               "objective.support=teacher")
    if cfg.xtok.loss != "lsm" and cfg.objective.name != "topk":
        refuse("xtok.loss", "the ULD ablations compare distributions: objective=topk")
    if cfg.pair.teacher_prompt != "own":
        refuse("pair.teacher_prompt", "the teacher reads its own template and tokens: "
               "pair.teacher_prompt=own (or objective.mask_unshared=true: the teacher reads the "
               "student's ids and only the ids both vocabularies share are trained)")
    checks = [("pair.teachers", bool(cfg.pair.teachers), "one teacher"),
              ("objective.rollouts_from", cfg.objective.rollouts_from != "student", "student rollouts"),
              ("schedule.name", cfg.schedule.name != "none", "schedule=none"),
              ("prompts.score", cfg.prompts.score != "none", "prompts.score=none"),
              ("diag.every", cfg.diag.every > 0, "diag.every=0 (token diagnostics compare ids)")]
    for field, on, allowed in checks:
        if on:
            refuse(field, allowed)
