"""Token diagnostics of a step's rollouts (SPEC §4, `diag.every`): where teacher q and student p
agree at the states the student visits, the log-ratio reward by response position, and how the
gradient splits over positions and micro-batches. Computed before the update, on the weights that
sampled; nothing here touches the learner's gradients, optimizer or random stream.

    p   the student's next-token distribution at rollout.temperature (the policy that sampled)
    q   the teacher's, as it scores (temperature 1)
Cheap path: the student's top-K and exact entropy from one chunked LM-head pass; the teacher's
top-K from the scores it already returned (objective=topk with the same K) or one extra "topk"
request. The teacher's entropy is exact where its backend sees the full softmax (HF), else the
top-K lower bound with the tail lumped (`diag/token/teacher_entropy_exact` says which).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from opd_exp.core.ranks import Dist
from opd_exp.core.types import StepBatch, TeacherScores, micro_slices
from opd_exp.engines.hf_models import load_model
from opd_exp.diagnostics.tokens import (STATS, by_position, overlap_from_topk, position_edges,
                                        summarise, topk_entropy)
from opd_exp.engines.hf_policy import HFPolicy, topk_and_entropy
from opd_exp.loop.geometry import (Geometry, SubspaceConstraint, block_matrices, cpu_copy,
                                   rest_matrices, share, write_locking)

def positional(x_B_T: torch.Tensor, mask_B_T: torch.Tensor, edges: list[int], prefix: str) -> dict:
    """by_position with every bucket present (NaN where this rank has no token): the ranks'
    metric names must agree."""
    out = {f"{prefix}_pos{a}_{b - 1}_{s}": float("nan") for a, b in zip(edges, edges[1:]) for s in STATS}
    out.update(by_position(x_B_T, mask_B_T, edges, prefix))
    return out


def teacher_topk(batch: StepBatch, teacher, scored, k: int) -> TeacherScores:
    t = batch.teacher
    if t.topk_idx_B_T_K is not None and t.topk_idx_B_T_K.shape[-1] == k:
        return t
    return teacher.score(scored, "topk", k)


@torch.no_grad()
def token_metrics(batch: StepBatch, view: HFPolicy, teacher, scored, cfg) -> dict[str, float]:
    """diag/token/*: overlap ratio and masses, entropy gap, overlap-token advantage (means over the
    step's response tokens, also over the first probe.early_positions), and the log-ratio
    log q(y_t) − log p(y_t) and teacher overlap mass by response position."""
    dc, r, mask = cfg.diag, batch.rollouts, batch.mask_B_T
    T = r.response_ids_B_T.shape[1]
    p_logp, p_idx, p_ent, p_picked = topk_and_entropy(view, r, dc.k, cfg.learner.micro_batch_size,
                                                      cfg.objective.chunk_size, cfg.rollout.temperature)
    q = teacher_topk(batch, teacher, scored, dc.k)
    on = mask > 0
    d = overlap_from_topk(p_idx[on], p_logp[on], q.topk_idx_B_T_K[on], q.topk_logq_B_T_K[on])
    q_ent = q.entropy_B_T[on] if q.entropy_B_T is not None else topk_entropy(q.topk_logq_B_T_K[on])
    # with the teacher's top-K bound, the student's bound too: a gap of like with like
    p_like = p_ent[on] if q.entropy_B_T is not None else topk_entropy(p_logp[on])
    d["entropy_gap"] = (q_ent - p_like).abs()
    d["entropy_student"], d["entropy_teacher"] = p_ent[on], q_ent
    out = {f"diag/token/{k}": v for k, v in summarise(d).items()}
    early = (torch.arange(T, device=mask.device) < cfg.probe.early_positions).expand_as(mask)[on]
    out.update({f"diag/token/early_{k}": v for k, v in summarise(
        {k: d[k][early] for k in ("ratio", "top1", "mass_teacher", "mass_student")}).items()})
    out["diag/token/teacher_entropy_exact"] = float(q.entropy_B_T is not None)
    edges = position_edges(max(T, cfg.rollout.max_new_tokens))  # the same buckets on every rank
    mass_B_T = torch.zeros_like(mask)
    mass_B_T[on] = d["mass_teacher"].to(mass_B_T.dtype)
    out.update(positional(mass_B_T, mask, edges, "diag/token/mass_teacher"))
    log_ratio = sampled_log_ratio(batch, teacher, scored, p_picked)
    out.update(positional(log_ratio, mask, edges, "diag/token/log_ratio"))
    return out


def sampled_log_ratio(batch: StepBatch, teacher, scored, picked_B_T: torch.Tensor) -> torch.Tensor:
    """log q(y_t) − log p(y_t) of the sampled tokens, [B, T]: the step's own teacher scores and
    learner log-probs where it has them (one "sampled" request otherwise), else the student's
    log-probs from the diagnostics' own LM-head pass (`picked_B_T`)."""
    logq = batch.teacher.logp_B_T
    if logq is None:
        logq = teacher.score(scored, "sampled").logp_B_T
    logp = batch.logp_old_B_T if batch.logp_old_B_T is not None else picked_B_T
    return (logq - logp) * batch.mask_B_T


def grad_metrics(batch: StepBatch, view: HFPolicy, objective, cfg) -> dict[str, float]:
    """On diag.grad_sequences of the rank's sequences, evenly spaced over its prompts: ‖∇L_b‖ for
    each response-position bucket b (the step's loss restricted to the bucket's tokens,
    normalised by all the tokens, so the buckets' gradients sum to the whole), and the variance of the micro-batch gradients
    (micro-batches of diag.grad_micro sequences, each its own token mean):
    grad_var = mean_i ‖g_i − ḡ‖², grad_var_rel = grad_var / ‖ḡ‖². torch.autograd.grad: the
    learner's .grad buffers are never touched."""
    dc = cfg.diag
    B = batch.rollouts.size  # a subset spread over the step's prompts (rows are grouped by prompt)
    sub = batch.select(torch.linspace(0, B - 1, min(dc.grad_sequences, B)).round().long().unique())
    params = [p for p in view.model.parameters() if p.requires_grad]
    T = sub.rollouts.response_ids_B_T.shape[1]
    pos = torch.arange(T, device=sub.mask_B_T.device)

    def grad(mb: StepBatch, n_tokens: float) -> torch.Tensor:
        loss, _ = objective.loss(view, mb, n_tokens)
        gs = torch.autograd.grad(loss, params, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                          for g, p in zip(gs, params)])

    def masked(mb: StepBatch, keep_B_T: torch.Tensor) -> StepBatch:
        return replace(mb, rollouts=replace(mb.rollouts, response_mask_B_T=mb.mask_B_T * keep_B_T))

    out = {}
    n = sub.mask_B_T.sum().clamp(min=1).item()
    fine = position_edges(max(T, cfg.rollout.max_new_tokens))  # the same buckets on every rank
    edges = fine[::2]  # coarser: [0, 2), [2, 8), [8, 32), …
    edges += [] if edges[-1] >= fine[-1] else fine[-1:]
    for a, b in zip(edges, edges[1:]):
        keep = ((pos >= a) & (pos < b)).float().expand_as(sub.mask_B_T)
        has = (sub.mask_B_T * keep).sum() > 0
        out[f"diag/token/grad_norm_pos{a}_{b - 1}"] = (
            grad(masked(sub, keep), n).norm().item() if has else float("nan"))
    gs = [grad(sub.select(s), sub.select(s).mask_B_T.sum().clamp(min=1).item())
          for s in micro_slices(sub.rollouts.size, dc.grad_micro)]
    if len(gs) >= 2:
        g = torch.stack(gs)
        var = (g - g.mean(0)).pow(2).sum(-1).mean().item()
        out["diag/token/grad_var"] = var
        out["diag/token/grad_var_rel"] = var / g.mean(0).pow(2).sum().clamp(min=1e-30).item()
    else:
        out["diag/token/grad_var"] = out["diag/token/grad_var_rel"] = float("nan")
    return out


class Diagnostics:
    """What the loop calls: `before_update` (token and gradient diagnostics, the subspace
    constraint's start), `after_update` (parameter geometry), `save` (with a checkpoint)."""

    def __init__(self, cfg, run_dir: Path, is_main: bool, geometry: Geometry | None,
                 constraint: SubspaceConstraint | None):
        self.cfg, self.run_dir, self.is_main = cfg, run_dir, is_main
        self.geometry, self.constraint = geometry, constraint

    @classmethod
    def make(cls, cfg, run_dir: Path, dist: Dist, policy: torch.nn.Module,
             resume_step: int | None) -> "Diagnostics":
        """`policy`: the learner's whole-weight student, W_0 on a fresh run; a resumed run reloads
        W_0 from pair.student in the policy's dtype. The ranks share the geometry's matrices
        (each keeps W_0 of its share, measures it on its device; rank 0 logs and writes); every
        rank keeps all of W_0 when the subspace constraint needs it."""
        lc, geometry, constraint = cfg.learner, None, None
        if cfg.diag.param_every or lc.subspace_constraint:
            dtype = next(policy.parameters()).dtype
            start = policy if resume_step is None else load_model(cfg.pair.student, "pair.student").to(dtype)
            matrices = block_matrices(start)
            mine = share(matrices, dist)
            held = set(matrices) if lc.subspace_constraint else mine  # the constraint needs all
            geometry = Geometry(cpu_copy({n: w for n, w in matrices.items() if n in held}), cfg.diag,
                                run_dir / "diag", write=dist.is_main, resume_step=resume_step or 0,
                                dist=dist, measured=mine)
        if lc.subspace_constraint:
            rest_start = (cpu_copy(rest_matrices(start)) if lc.subspace_rest == "constrain"
                          else None)
            constraint = SubspaceConstraint(max(1, int(lc.subspace_from * cfg.trainer.steps)),
                                            lc.subspace_k, lc.subspace_project, lc.subspace_rest,
                                            measure_every=cfg.diag.param_every,
                                            rest_start=rest_start)
        return cls(cfg, run_dir, dist.is_main, geometry, constraint)

    def token_due(self, step: int) -> bool:
        """Token diagnostics run before update `step` + 1."""
        return bool(self.cfg.diag.every) and (step + 1) % self.cfg.diag.every == 0

    def before_update(self, step: int, batch: StepBatch, learner, teacher, scored,
                      objective, on_policy: bool) -> dict[str, float]:
        """Zero-based optimizer step `step`: token diagnostics when (step + 1) % diag.every == 0
        (on the student's own rollouts, or on the off-policy traces a step trains on:
        diag/token/on_policy says which)."""
        out, dc = {}, self.cfg.diag
        if self.constraint is not None and self.constraint.due(step):
            self.constraint.start(self.geometry, learner.policy)
        if self.constraint is not None:
            self.constraint.before_update(step, learner.policy)
        if self.token_due(step):
            view = HFPolicy(learner.policy, vocab_size=getattr(learner.view, "vocab_size", None))
            with torch.random.fork_rng():
                out.update(token_metrics(batch, view, teacher, scored, self.cfg))
                out["diag/token/on_policy"] = float(on_policy)
                if dc.grad_sequences and self.cfg.learner.backend == "torch":
                    out.update(grad_metrics(batch, learner.view, objective, self.cfg))
        return out

    def after_learner_update(self, policy: torch.nn.Module) -> dict[str, float]:
        """Right after the learner's update, before the sampler takes the weights: the subspace
        constraint's projection of the step (learner.subspace_project=update) and its measure."""
        return self.constraint.after_update(policy) if self.constraint is not None else {}

    def after_update(self, done: int, policy: torch.nn.Module) -> dict[str, float]:
        """diag/param/* every diag.param_every steps, the matrices shared by the ranks (every
        rank calls it; rank 0 logs)."""
        every = self.cfg.diag.param_every
        if self.geometry is None or not every or done % every:
            return {}
        return self.geometry.metrics(policy, done)

    def finish(self) -> dict[int, float]:
        """Subspace locking Sim_K(t, end) of the stored steps → <run>/diag/locking.json."""
        d = self.run_dir / "diag"
        return write_locking(d / "subspaces", d / "locking.json") if self.geometry else {}

    def save(self, directory: Path) -> None:
        if self.constraint is not None and self.is_main:
            self.constraint.save(directory)

    def load(self, directory: Path, policy: torch.nn.Module) -> None:
        if self.constraint is not None:
            self.constraint.load(directory, policy)
