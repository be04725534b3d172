"""Parameter-space geometry of a run (SPEC §4): the weights against the start weights W_0, the
subspaces the updates live in, and subspace-constrained training.

    W_0      the student's weights at step 0 (a resumed run reloads them from pair.student)
    ΔW_t     W_t − W_0 of every weight matrix of the transformer blocks (embeddings and the LM
             head excluded: their rows are tokens, not directions of the residual stream)
    V_K(t)   top-K right singular vectors of ΔW_t, [in, K]; stored per diagnostic step under
             <run>/diag/subspaces/ so Sim_K(t, end) can be computed when the run ends

The maths is in opd_exp/diagnostics/geometry.py; this module holds the state.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from opd_exp.core.ranks import Dist
from opd_exp.diagnostics.geometry import (StartSpectrum, aggregate, layer_type, matrix_metrics,
                                          model_matrices, project_rows, start_spectrum,
                                          subspace_similarity, top_right_singular)

SKIPPED_TYPES = ("embed_tokens", "lm_head")


def block_matrices(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The 2-D weights of the transformer blocks, by parameter name (the live tensors)."""
    return {n: p for n, p in model_matrices(model.named_parameters()).items()
            if layer_type(n) not in SKIPPED_TYPES}


def rest_matrices(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The 2-D weights outside the blocks: the token embeddings and an untied LM head."""
    return {n: p for n, p in model_matrices(model.named_parameters()).items()
            if layer_type(n) in SKIPPED_TYPES}


def cpu_copy(matrices: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: w.detach().to("cpu", copy=True) for n, w in matrices.items()}


def share(names, dist: Dist | None) -> set[str]:
    """The matrices one rank measures: every W-th by name, from its rank on (all with one rank)."""
    names = sorted(names)
    return set(names if dist is None else dist.shard(names))


class Geometry:
    """W_0 and the diag/param/* metrics of the weights against it (`diag.*`). With several ranks
    (`dist`) each rank holds W_0 of its share of the matrices and measures those (`share`); the
    per-matrix numbers and subspaces are gathered, so every rank returns the same metrics — every
    rank must call `metrics` at the same steps."""

    def __init__(self, start: dict[str, torch.Tensor], diag_cfg, out_dir: Path, write: bool,
                 resume_step: int = 0, dist: Dist | None = None, measured: set[str] | None = None):
        """`start`: W_0 of the matrices this rank holds; `measured`: those it measures (its
        `share`; None: all it holds), the others' numbers gathered from the ranks of `dist`;
        `out_dir/subspaces/` holds V_K per diagnostic step (rank 0 writes it, `write`); a run
        resumed at `resume_step` reads back its last one as the previous step's."""
        self.w0, self.c, self.out_dir, self.write, self.dist = start, diag_cfg, out_dir, write, dist
        self.measured = set(start) if measured is None else measured  # those this rank measures
        self.prev: dict[str, torch.Tensor] | None = None
        self.start: dict[str, StartSpectrum] = {}  # W_0's spectra, by matrix, taken at first use
        done = [f for f in sorted((out_dir / "subspaces").glob("step_*.pt"))
                if int(f.stem.split("_")[1]) <= resume_step] if resume_step else []
        if done:
            self.prev = {n: v.float() for n, v in torch.load(done[-1])["bases"].items()}

    def bases(self, model: torch.nn.Module, k: int) -> dict[str, torch.Tensor]:
        """V_K of ΔW for every block matrix, [in, K] float32."""
        return {n: top_right_singular(w.detach().float().cpu() - self.w0[n].float(), k)
                for n, w in block_matrices(model).items()}

    @torch.no_grad()
    def metrics(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        """diag/param/<layer type or all>/<metric> (parameter-count weighted over the matrices)
        and diag/param/all/locking_prev = Sim_K(previous diagnostic step, now); V_K(step)
        stored under out_dir/subspaces/."""
        c, per, bases, t0 = self.c, {}, {}, time.time()
        for n, w in block_matrices(model).items():
            if n not in self.measured:  # another rank's share
                continue
            # on the weights' own device (a GPU's float64 SVD), one matrix at a time
            w0, wt = self.w0[n].to(w.device), w.detach()
            if n not in self.start:  # W_0's spectrum: once per run, kept in CPU memory
                self.start[n] = start_spectrum(w0, c.param_k, c.mask_rank).to("cpu")
            per[n] = (matrix_metrics(w0, wt, c.param_k, c.eta, c.mask_fraction, c.mask_rank,
                                     start=self.start[n].to(w.device)), w.numel())
            bases[n] = top_right_singular(wt.float() - w0.float(), c.param_k).cpu()
        if self.dist is not None and self.dist.world_size > 1:
            for p, b in self.dist.all_gather((per, bases)):
                per.update(p)
                bases.update(b)
            per, bases = dict(sorted(per.items())), dict(sorted(bases.items()))
        out = {f"diag/param/{k}": v for k, v in aggregate(per).items()}
        numel = {n: size for n, (_, size) in per.items()}
        if self.prev is not None:
            out["diag/param/all/locking_prev"] = mean_similarity(self.prev, bases, numel)
        self.prev = {n: v.half().float() for n, v in bases.items()}  # as stored, as a resume reads it
        if self.write:
            d = self.out_dir / "subspaces"
            d.mkdir(parents=True, exist_ok=True)
            torch.save({"bases": {n: v.half() for n, v in bases.items()}, "numel": numel},
                       d / f"step_{step:06d}.pt")
        out["diag/param_seconds"] = time.time() - t0
        return out


def mean_similarity(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                    numel: dict[str, int]) -> float:
    """Parameter-count weighted mean over the matrices of Sim_K(a, b)."""
    weights = {n: numel[n] for n in a}
    total = sum(weights.values())
    return sum(weights[n] * subspace_similarity(a[n].float(), b[n].float()) for n in a) / total


def locking(subspace_dir: Path) -> dict[int, float]:
    """Sim_K(t, end) for every stored step t (end = the last stored step): the share of the final
    update subspace already spanned at step t, parameter-count weighted over the block matrices."""
    files = sorted(subspace_dir.glob("step_*.pt"))
    if not files:
        return {}
    end = torch.load(files[-1])
    return {int(f.stem.split("_")[1]): mean_similarity(torch.load(f)["bases"], end["bases"], end["numel"])
            for f in files}


def write_locking(subspace_dir: Path, out: Path) -> dict[int, float]:
    sims = locking(subspace_dir)
    if sims:
        out.write_text(json.dumps({str(k): v for k, v in sims.items()}, indent=1) + "\n")
    return sims


class SubspaceConstraint:
    """`learner.subspace_constraint`: from optimizer step t0 on, every block matrix is kept to
    V_K = top-K right singular vectors of ΔW at t0 (SPEC §4), by `project`:
    - gradient: g ← g · V_K V_Kᵀ, by gradient hooks on the parameters, before any accumulation or
      reduction (the projection is linear, so projecting each micro-batch's gradient projects
      their sum); AdamW's per-coordinate scaling then moves the step partly out of span(V_K);
    - update: the step's change of each matrix, ΔW_step = W_after − W_before (weight decay
      included), replaced by ΔW_step · V_K V_Kᵀ after the learner's update (`after_update`);
      the parameters outside the blocks by `rest`: train (as the optimizer moved them), freeze
      (put back), or constrain (the embeddings and an untied LM head projected like the block
      matrices, onto V_K of their own ΔW at t0 — `rest_start` holds their W_0 until then — and
      every other parameter, norms and biases, put back).
    `after_update` also measures diag/param/outside_span = ‖ΔW_step − ΔW_step V_K V_Kᵀ‖ / ‖ΔW_step‖
    over the matrices for the step as applied (update: also `outside_span_proposed`, the
    optimizer's own step), on every step of update mode and on `measure_every`-th steps of
    gradient mode (a copy of the matrices is kept over those updates)."""

    def __init__(self, t0: int, k: int, project: str = "gradient", rest: str = "train",
                 measure_every: int = 1, rest_start: dict[str, torch.Tensor] | None = None):
        if rest == "constrain" and rest_start is None:
            raise ValueError("rest='constrain' needs rest_start: W_0 of the embeddings")
        self.t0, self.k, self.project, self.rest = t0, k, project, rest
        self.rest_start = rest_start
        self.measure_every = measure_every
        self.bases: dict[str, torch.Tensor] | None = None
        self._hooks: list = []
        self._before: dict[str, torch.Tensor] | None = None

    def due(self, step: int) -> bool:
        """Start at the first step >= t0 without bases (a resumed run keeps those it saved)."""
        return self.bases is None and step >= self.t0

    def start(self, geometry: Geometry, model: torch.nn.Module) -> None:
        bases = geometry.bases(model, self.k)
        if self.rest == "constrain":
            bases.update({n: top_right_singular(w.detach().float().cpu() - self.rest_start[n].float(),
                                                self.k) for n, w in rest_matrices(model).items()})
            self.rest_start = None  # W_0 of the embeddings: needed only for these bases
        self.attach(model, bases)

    def attach(self, model: torch.nn.Module, bases: dict[str, torch.Tensor]) -> None:
        for h in self._hooks:  # one projection, never two stacked
            h.remove()
        self._hooks, self.bases = [], bases
        if self.project != "gradient":
            return
        for n, p in block_matrices(model).items():
            v = bases[n].to(p.device, torch.float32)
            self._hooks.append(p.register_hook(
                lambda g, v=v: project_rows(g.float(), v).to(g.dtype)))

    @torch.no_grad()
    def before_update(self, step: int, model: torch.nn.Module) -> None:
        """Keep the weights the update starts from (zero-based step `step`), when it is projected
        or measured."""
        measured = self.project == "update" or (self.measure_every and (step + 1) % self.measure_every == 0)
        if self.bases is None or not measured:
            self._before = None
            return
        keep = self.project == "update" and self.rest != "train"
        mats = block_matrices(model)
        self._before = {n: p.detach().clone() for n, p in model.named_parameters()
                        if n in mats or (keep and p.requires_grad)}

    @torch.no_grad()
    def after_update(self, model: torch.nn.Module) -> dict[str, float]:
        """The update projected (update mode) and measured: diag/param/outside_span."""
        if self._before is None:
            return {}
        mats, out_sq, all_sq, proposed_out_sq, proposed_sq = block_matrices(model), 0.0, 0.0, 0.0, 0.0
        for n, p in model.named_parameters():
            if n not in self._before:
                continue
            if n not in mats and (self.rest != "constrain" or n not in self.bases):
                # rest=freeze, or a norm under rest=constrain: put back
                p.copy_(self._before[n])
                continue
            acc = torch.promote_types(p.dtype, torch.float32)  # float64 weights: float64 maths
            v = self.bases[n].to(p.device, acc)
            before = self._before[n].to(acc)
            step_ = p.to(acc) - before
            inside = (step_ @ v) @ v.T
            if self.project == "update":
                proposed_out_sq += float((step_ - inside).square().sum())
                proposed_sq += float(step_.square().sum())
                p.copy_((before + inside).to(p.dtype))
                step_ = p.to(acc) - before  # as applied, after rounding to the weights' dtype
                inside = (step_ @ v) @ v.T
            if n not in mats:  # rest=constrain: projected, not in the blocks' measure
                continue
            out_sq += float((step_ - inside).square().sum())
            all_sq += float(step_.square().sum())
        self._before = None
        m = {"diag/param/outside_span": (out_sq / all_sq) ** 0.5 if all_sq > 0 else 0.0}
        if self.project == "update":
            m["diag/param/outside_span_proposed"] = (proposed_out_sq / proposed_sq) ** 0.5 if proposed_sq > 0 else 0.0
        return m

    def save(self, directory: Path) -> None:
        if self.bases is not None:
            torch.save({"bases": self.bases, "t0": self.t0}, directory / "subspace_bases.pt")

    def load(self, directory: Path, model: torch.nn.Module) -> None:
        """Resume: the bases of the checkpoint and the t0 they were taken at (a run saved after
        its t0), else none yet."""
        path = directory / "subspace_bases.pt"
        if path.exists():
            saved = torch.load(path)
            self.t0 = saved["t0"]
            self.attach(model, saved["bases"])
