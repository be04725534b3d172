"""Parameter-space geometry (opd_exp/diagnostics/geometry.py) against independent references:
a hand-rolled bf16 rounding with a Python loop, scipy's subspace angles, numpy SVDs and argsorts,
closed forms (rank-1 / orthogonal stable rank, Pareto tail index, K/d for random subspaces)."""

import math
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from opd_exp.diagnostics import geometry as geo


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _bf16_round(x: float) -> float:
    """float32 → bf16 (round to nearest, ties to even on the dropped 16 bits) → float, by bits."""
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _orthonormal(d: int, k: int, rng: np.random.Generator) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((d, k)))[0]


# --- sparsity ---------------------------------------------------------------------------------

def test_unchanged_bf16_matches_a_brute_force_loop():
    g = _gen(0)
    w0 = torch.randn(9, 11, generator=g)
    w0[0, :3] = 0.0
    # relative changes below η, around bf16's resolution (2^-8 … 2^-7) and well above it
    rel = torch.tensor([0.0, 1e-5, 5e-4, 9e-4, 1.1e-3, 2e-3, 3e-3, 4e-3, 6e-3, 1e-2, 0.1])
    wt = w0 * (1 + rel[torch.randint(len(rel), w0.shape, generator=g)])
    wt[0, 0], wt[0, 1] = 1e-30, 1e-3   # 0 → a tiny number, 0 → a clearly visible one
    got = geo.unchanged_bf16(w0, wt, eta=1e-3)

    expect = torch.zeros_like(got)
    for i in range(w0.shape[0]):
        for j in range(w0.shape[1]):
            a, b = _bf16_round(float(w0[i, j])), _bf16_round(float(wt[i, j]))
            expect[i, j] = abs(b - a) <= 1e-3 * max(abs(a), abs(b))
    assert got.dtype == torch.bool
    assert torch.equal(got, expect)
    changed_fp32 = wt != w0
    # non-trivial: some fp32 changes vanish under bf16, some survive
    assert (got & changed_fp32).any() and (~got & changed_fp32).any()
    assert not got[0, 1] and got[0, 2]


def test_unchanged_bf16_accepts_bf16_inputs_and_eta():
    w0 = torch.tensor([[1.0, 2.0, -4.0]])
    wt = torch.tensor([[1.0, 2.0 + 2**-6, -4.0 - 2**-5]])   # one bf16 ulp each: rel. ≈ 7.8e-3
    assert geo.unchanged_bf16(w0, wt).tolist() == [[True, False, False]]
    assert geo.unchanged_bf16(w0.bfloat16(), wt.bfloat16(), eta=0.01).tolist() == [[True] * 3]


# --- singular subspaces and spectra -----------------------------------------------------------

def test_principal_cos_matches_scipy_subspace_angles():
    g = _gen(1)
    for trial in range(3):
        w0 = torch.randn(12, 9, generator=g, dtype=torch.float64)
        wt = w0 + (0.3 + 0.3 * trial) * torch.randn(12, 9, generator=g, dtype=torch.float64)
        u0 = np.linalg.svd(w0.numpy())[0][:, :4]
        ut = np.linalg.svd(wt.numpy())[0][:, :4]
        ref = np.sort(np.cos(scipy.linalg.subspace_angles(u0, ut)))[::-1]
        got = geo.principal_cos(w0.float(), wt.float(), 4)
        assert got.shape == (4,) and got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), ref, atol=1e-5)
        assert ref.min() < 0.99   # the angles are non-trivial
    assert torch.allclose(geo.principal_cos(w0, w0, 4), torch.ones(4))


def test_top_right_singular_spans_numpys_top_right_vectors():
    g = _gen(2)
    dw = torch.randn(7, 10, generator=g)
    v = geo.top_right_singular(dw, 3)
    assert v.shape == (10, 3) and v.dtype == torch.float32
    ref = np.linalg.svd(dw.double().numpy())[2][:3].T
    np.testing.assert_allclose(np.abs(v.numpy().T @ ref), np.eye(3), atol=1e-5)
    assert geo.top_right_singular(dw, 50).shape == (10, 7)   # capped at rank bound


def test_spectral_shift_matches_numpy():
    g = _gen(3)
    w0 = torch.randn(8, 6, generator=g)
    wt = w0 + 0.2 * torch.randn(8, 6, generator=g)
    s0 = np.linalg.svd(w0.double().numpy(), compute_uv=False)
    st = np.linalg.svd(wt.double().numpy(), compute_uv=False)
    ref = np.linalg.norm(st - s0) / np.linalg.norm(s0)
    assert ref > 1e-3
    assert geo.spectral_shift(w0, wt) == pytest.approx(ref, rel=1e-5)
    assert geo.spectral_shift(w0, 2 * w0) == pytest.approx(1.0, rel=1e-6)


def test_stable_rank_closed_forms():
    g = _gen(4)
    u, v = torch.randn(10, 1, generator=g), torch.randn(1, 7, generator=g)
    assert geo.stable_rank(u @ v) == pytest.approx(1.0, rel=1e-6)
    q = torch.from_numpy(np.linalg.qr(np.random.default_rng(4).standard_normal((6, 6)))[0])
    assert geo.stable_rank(q) == pytest.approx(6.0, rel=1e-6)
    assert geo.stable_rank(torch.diag(torch.tensor([3.0, 4.0]))) == pytest.approx(25 / 16)
    assert math.isnan(geo.stable_rank(torch.zeros(3, 4)))


def test_hill_alpha_recovers_a_pareto_tail_and_the_formula():
    u = torch.rand(20_000, generator=_gen(5), dtype=torch.float64)
    x = u.pow(-1 / 3)   # Pareto(x_m = 1, α = 3)
    assert geo.hill_alpha(x, k=1000) == pytest.approx(3.0, rel=0.10)
    # by hand: ξ = (ln(8/2) + ln(4/2)) / 2 with the default k = max(2, 4 // 4) = 2
    s = torch.tensor([1.0, 8.0, 2.0, 4.0, 0.0])
    assert geo.hill_alpha(s) == pytest.approx(1 / (1.5 * math.log(2)))
    assert geo.hill_alpha(s, k=99) == pytest.approx(1 / ((math.log(8) + math.log(4) + math.log(2)) / 3))
    twelve = torch.rand(12, generator=_gen(15), dtype=torch.float64) + 0.1   # default k = 12 // 4 = 3
    top = sorted(twelve.tolist(), reverse=True)
    assert geo.hill_alpha(twelve) == pytest.approx(3 / sum(math.log(t / top[3]) for t in top[:3]))
    assert math.isnan(geo.hill_alpha(torch.tensor([3.0, 1.0, 0.0])))


# --- subspace similarity and projection -------------------------------------------------------

def test_subspace_similarity_identical_rotated_and_random():
    rng = np.random.default_rng(6)
    v = _orthonormal(30, 5, rng)
    r = _orthonormal(5, 5, rng)
    assert geo.subspace_similarity(torch.from_numpy(v), torch.from_numpy(v)) == pytest.approx(1.0)
    assert geo.subspace_similarity(torch.from_numpy(v), torch.from_numpy(v @ r)) == pytest.approx(1.0)
    d, k = 400, 8
    sims = [geo.subspace_similarity(torch.from_numpy(_orthonormal(d, k, rng)),
                                    torch.from_numpy(_orthonormal(d, k, rng))) for _ in range(20)]
    assert np.mean(sims) == pytest.approx(k / d, rel=0.30)


def test_project_rows_keeps_the_span_kills_the_complement_and_is_idempotent():
    rng = np.random.default_rng(7)
    v = _orthonormal(16, 4, rng)
    inside = rng.standard_normal((5, 4)) @ v.T
    outside = rng.standard_normal((5, 16)) @ (np.eye(16) - v @ v.T)
    vt = torch.from_numpy(v).float()
    g_in, g_out = torch.from_numpy(inside).float(), torch.from_numpy(outside).float()
    assert (geo.project_rows(g_in, vt) - g_in).abs().max() <= 1e-5
    assert geo.project_rows(g_out, vt).abs().max() <= 1e-5
    assert g_out.abs().max() > 0.1
    g = torch.from_numpy(rng.standard_normal((5, 16))).float()
    once = geo.project_rows(g, vt)
    assert (geo.project_rows(once, vt) - once).abs().max() <= 1e-5
    np.testing.assert_allclose(once.numpy(), g.numpy() @ v @ v.T, atol=1e-5)
    assert geo.project_rows(g.bfloat16(), vt).dtype == torch.bfloat16


# --- mask overlaps ----------------------------------------------------------------------------

def test_mask_overlaps_match_a_numpy_brute_force():
    g = _gen(8)
    w0 = torch.randn(10, 12, generator=g)
    smallest = torch.zeros(120, dtype=torch.bool)
    smallest[w0.abs().flatten().argsort()[:8]] = True   # the update favours small entries
    changed = (torch.rand(10, 12, generator=g) < 0.3) | smallest.view(10, 12)
    wt = torch.where(changed, w0 * 1.5 + 0.1, w0)   # clearly updated entries only
    fraction, rank, m = 0.1, 3, 12

    a = w0.double().numpy()
    u, s, vh = np.linalg.svd(a, full_matrices=False)
    recon = (u[:, :rank] * s[:rank]) @ vh[:rank]
    princ = set(np.argsort(-np.abs(recon).ravel())[:m].tolist())
    low = set(np.argsort(np.abs(a).ravel())[:m].tolist())
    upd = set(np.flatnonzero(changed.numpy().ravel()).tolist())
    ref = (len(princ & upd) / len(upd), len(low & upd) / len(upd))

    got = geo.mask_overlaps(w0, wt, fraction=fraction, rank=rank)
    assert got == pytest.approx(ref)
    assert ref[0] != ref[1]
    assert all(math.isnan(x) for x in geo.mask_overlaps(w0, w0.clone()))


# --- per matrix and aggregation ---------------------------------------------------------------

def test_matrix_metrics_keys_and_limits():
    g = _gen(9)
    w0 = torch.randn(6, 5, generator=g)
    keys = {"sparsity", "principal_cos_mean", "principal_cos_min", "spectral_shift",
            "mask_principal", "mask_low", "stable_rank", "hill_alpha", "update_rel_norm"}
    same = geo.matrix_metrics(w0, w0.clone(), k=16)   # k capped at 5
    assert set(same) == keys
    assert same["sparsity"] == 1.0 and same["update_rel_norm"] == 0.0
    assert same["principal_cos_mean"] == pytest.approx(1.0) and same["spectral_shift"] == 0.0
    assert all(math.isnan(same[k]) for k in ("mask_principal", "mask_low", "stable_rank", "hill_alpha"))

    u, v = torch.randn(6, 1, generator=g), torch.randn(1, 5, generator=g)
    wt = w0 + u @ v
    m = geo.matrix_metrics(w0, wt, k=2, fraction=0.2, rank=2)
    assert m["stable_rank"] == pytest.approx(1.0, rel=1e-5)
    assert m["update_rel_norm"] == pytest.approx(float((u @ v).norm() / w0.norm()), rel=1e-5)
    assert m["sparsity"] == pytest.approx(geo.unchanged_bf16(w0, wt).float().mean().item())
    cos = geo.principal_cos(w0, wt, 2)
    assert m["principal_cos_min"] == pytest.approx(cos.min().item(), abs=1e-6)
    assert m["spectral_shift"] == pytest.approx(geo.spectral_shift(w0, wt), rel=1e-6)
    assert (m["mask_principal"], m["mask_low"]) == pytest.approx(geo.mask_overlaps(w0, wt, 0.2, 2))


def test_aggregate_weights_by_numel_and_skips_nan():
    nan = float("nan")
    per = {
        "model.layers.0.self_attn.q_proj.weight": ({"a": 1.0, "b": nan}, 100),
        "model.layers.1.self_attn.q_proj.weight": ({"a": 4.0, "b": nan}, 300),
        "model.layers.0.mlp.gate_proj.weight": ({"a": 2.0, "b": 5.0}, 600),
    }
    out = geo.aggregate(per)
    assert set(out) == {f"{t}/{m}" for t in ("q_proj", "gate_proj", "all") for m in ("a", "b")}
    assert out["q_proj/a"] == pytest.approx((100 * 1 + 300 * 4) / 400)
    assert math.isnan(out["q_proj/b"])
    assert out["gate_proj/a"] == 2.0 and out["gate_proj/b"] == 5.0
    assert out["all/a"] == pytest.approx((100 * 1 + 300 * 4 + 600 * 2) / 1000)
    assert out["all/b"] == 5.0


def test_layer_type_and_model_matrices():
    assert geo.layer_type("model.layers.3.self_attn.q_proj.weight") == "q_proj"
    assert geo.layer_type("model.layers.0.mlp.gate_proj.weight") == "gate_proj"
    assert geo.layer_type("mlp.gate_proj.weight") == "gate_proj"
    assert geo.layer_type("model.embed_tokens.weight") == "embed_tokens"
    assert geo.layer_type("lm_head.weight") == "lm_head"
    params = [("a.weight", torch.zeros(3, 4)), ("a.bias", torch.zeros(3)),
              ("n.weight", torch.zeros(4)), ("e.weight", torch.zeros(5, 2))]
    assert list(geo.model_matrices(params)) == ["a.weight", "e.weight"]


def test_w0s_spectrum_is_taken_once_and_gives_the_same_metrics(monkeypatch, tmp_path):
    """matrix_metrics with W_0's stored spectrum equals the one that decomposes W_0 itself, and
    a run's Geometry decomposes each W_0 once, however many diagnostic steps."""
    from omegaconf import OmegaConf

    from opd_exp.loop import geometry as loop_geo

    g = torch.Generator().manual_seed(7)
    w0 = torch.randn(24, 40, generator=g)
    wt = w0 + 0.01 * torch.randn(24, 40, generator=g)
    fresh = geo.matrix_metrics(w0, wt, 4, 1e-3, 0.05, 3)
    stored = geo.matrix_metrics(w0, wt, 4, 1e-3, 0.05, 3, start=geo.start_spectrum(w0, 4, 3))
    assert fresh.keys() == stored.keys()
    assert all(fresh[k] == pytest.approx(stored[k], rel=1e-12, abs=1e-12) for k in fresh)

    calls = []
    real = loop_geo.start_spectrum
    monkeypatch.setattr(loop_geo, "start_spectrum", lambda *a: calls.append(1) or real(*a))
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Module()])
    model.layers[0].mlp = torch.nn.Module()
    model.layers[0].mlp.up_proj = torch.nn.Linear(40, 24, bias=False)
    start = loop_geo.cpu_copy(loop_geo.block_matrices(model))
    cfg = OmegaConf.create({"param_k": 4, "eta": 1e-3, "mask_fraction": 0.05, "mask_rank": 3})
    geometry = loop_geo.Geometry(start, cfg, tmp_path, write=False)
    for step in (1, 2, 3):
        with torch.no_grad():
            model.layers[0].mlp.up_proj.weight.add_(0.01)
        geometry.metrics(model, step)
    assert len(calls) == 1


def _tiny_blocks(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList()
    for _ in range(3):
        layer = torch.nn.Module()
        layer.mlp = torch.nn.Module()
        layer.mlp.up_proj = torch.nn.Linear(20, 12, bias=False)
        layer.mlp.down_proj = torch.nn.Linear(12, 20, bias=False)
        model.layers.append(layer)
    return model


def _geometry_metrics(rank: int, world: int, store: str, out: str) -> None:
    """One rank of a gloo job (or the whole job with world = 1): W_0 of its share, metrics of the
    moved weights, gathered."""
    from omegaconf import OmegaConf

    from opd_exp.core.ranks import Dist
    from opd_exp.loop import geometry as loop_geo

    if world > 1:
        torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    dist = Dist(rank=rank, world_size=world)
    model = _tiny_blocks(0)
    matrices = loop_geo.block_matrices(model)
    mine = loop_geo.share(matrices, dist)
    start = loop_geo.cpu_copy({n: w for n, w in matrices.items() if n in mine})
    cfg = OmegaConf.create({"param_k": 4, "eta": 1e-3, "mask_fraction": 0.05, "mask_rank": 3})
    geometry = loop_geo.Geometry(start, cfg, Path(out).parent, write=False, dist=dist, measured=mine)
    moved = _tiny_blocks(1)
    with torch.no_grad():
        for p, q in zip(model.parameters(), moved.parameters()):
            p.add_(0.01 * q)
    first = geometry.metrics(model, 1)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)
    second = geometry.metrics(model, 2)
    if rank == 0:
        torch.save((first, second, sorted(mine)), out)
    dist.close()  # barrier, then the group destroyed and collected


def test_the_ranks_share_the_matrices_and_gather_the_one_process_numbers(tmp_path):
    """Two gloo ranks, each with W_0 of half the matrices: the same diag/param/* (locking_prev
    included) as one process holding them all."""
    import torch.multiprocessing as mp

    _geometry_metrics(0, 1, "", str(tmp_path / "one.pt"))
    mp.spawn(_geometry_metrics, args=(2, str(tmp_path / "store"), str(tmp_path / "two.pt")), nprocs=2)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert len(two[2]) == 3 and len(one[2]) == 6  # rank 0 measured half of the 6 matrices
    for a, b in zip(one[:2], two[:2]):
        assert a.keys() == b.keys() and "diag/param/all/locking_prev" in two[1]
        assert all(a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-12) for k in a if not k.endswith("seconds"))
