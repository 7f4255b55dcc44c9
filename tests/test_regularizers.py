"""Tests for models/regularizers.py: SIGReg, the VICReg terms, the diagnostics, and their
data-parallel correctness (two gloo processes on CPU)."""

from __future__ import annotations

import datetime
import math
import os

import numpy as np
import pytest
import torch

from models.regularizers import (
    _quadrature,
    effective_rank,
    latent_std,
    sigreg,
    variance_covariance,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# SIGReg, single process
# --------------------------------------------------------------------------------------------


def test_sigreg_matches_closed_form_epps_pulley():
    """With a fine grid and a wide range, the quadrature equals the closed-form statistic
    N ∫ |φ̂ - φ|² e^{-t²/2} dt over the whole line. With D = 1 the only directions are ±1,
    and both give the same statistic."""
    x = torch.randn(50, 1, generator=_gen(0), dtype=torch.float64)
    got = sigreg(x, num_projections=3, generator=_gen(1), num_points=4001, t_max=12.0)
    v = x[:, 0]
    n = v.numel()
    diff = v[:, None] - v[None, :]
    closed = (
        math.sqrt(2 * math.pi) / n * torch.exp(-0.5 * diff.square()).sum()
        - 2 * math.sqrt(math.pi) * torch.exp(-0.25 * v.square()).sum()
        + n * math.sqrt(2 * math.pi / 3)
    )
    torch.testing.assert_close(got, closed, rtol=1e-7, atol=1e-9)


def test_sigreg_near_null_value_for_gaussian_and_large_otherwise():
    z = torch.randn(4096, 64, generator=_gen(0))
    t, phi, w = _quadrature(17, 3.0, torch.device("cpu"), torch.float64)
    null_mean = float((w * (1 - phi.square())).sum())  # E[statistic] under N(0, I), any N
    assert 1.0 < null_mean < 1.1
    gauss = sigreg(z, generator=_gen(1)).item()
    collapsed = sigreg(z[:1].expand(4096, -1).contiguous(), generator=_gen(1)).item()
    scaled = sigreg(10 * z, generator=_gen(1)).item()
    assert 0.5 * null_mean < gauss < 2 * null_mean
    # A departure from N(0, I) scales with N = 4096: it is thousands here, not about 1.
    assert collapsed > 500 * gauss
    assert scaled > 500 * gauss


def test_sigreg_scaling_is_batch_size_independent_under_the_null():
    """N·E|φ̂ - φ|² does not depend on N, so Gaussian batches of very different sizes give
    statistics of the same size (about 1.05)."""
    g = _gen(3)
    means = []
    for n in (32, 2048):
        vals = [sigreg(torch.randn(n, 16, generator=g), 64, g).item() for _ in range(8)]
        means.append(sum(vals) / len(vals))
    assert all(0.7 < m < 1.4 for m in means), means


def test_sigreg_deterministic_given_generator_and_fresh_each_call():
    z = torch.randn(256, 32, generator=_gen(0))
    a = sigreg(z, 16, _gen(7))
    b = sigreg(z, 16, _gen(7))
    assert torch.equal(a, b)
    g = _gen(7)
    first, second = sigreg(z, 16, g), sigreg(z, 16, g)
    assert not torch.equal(first, second)  # the generator advanced: new projections
    assert torch.equal(first, a)


def test_sigreg_is_differentiable_and_half_precision_upcasts():
    z = torch.randn(64, 8, generator=_gen(0), requires_grad=True)
    loss = sigreg(z, 8, _gen(1))
    (grad,) = torch.autograd.grad(loss, z)
    assert grad.shape == z.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0
    low = sigreg(z.detach().bfloat16(), 8, _gen(1))
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, loss.detach(), rtol=0.05, atol=0.05)


def test_sigreg_gradient_descent_decollapses():
    g = _gen(0)
    z = torch.nn.Parameter(0.02 * torch.randn(128, 8, generator=g) + 0.5)
    opt = torch.optim.Adam([z], lr=0.05)
    start = latent_std(z)
    for _ in range(60):
        loss = sigreg(z, 32, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert start < 0.05
    assert 0.7 < latent_std(z) < 1.3
    assert abs(float(z.detach().mean())) < 0.2
    assert effective_rank(z) > 6


def test_sigreg_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        sigreg(torch.zeros(4, 3, 2))
    with pytest.raises(ValueError, match="num_points"):
        sigreg(torch.zeros(4, 3), num_points=1)
    with pytest.raises(ValueError, match="empty"):
        sigreg(torch.zeros(0, 3))
    with pytest.raises(TypeError, match="floating"):
        sigreg(torch.zeros(4, 3, dtype=torch.long))


# --------------------------------------------------------------------------------------------
# VICReg terms and diagnostics, single process
# --------------------------------------------------------------------------------------------


def test_variance_covariance_matches_reference():
    z = torch.randn(200, 6, generator=_gen(0), dtype=torch.float64) @ torch.randn(
        6, 6, generator=_gen(1), dtype=torch.float64
    )
    var_loss, cov_loss = variance_covariance(z, gamma=1.5)
    cov = torch.cov(z.T)
    std = torch.sqrt(cov.diagonal() + 1e-4)
    off = cov - torch.diag(cov.diagonal())
    torch.testing.assert_close(var_loss, torch.relu(1.5 - std).mean())
    torch.testing.assert_close(cov_loss, off.square().sum() / 6)


def test_variance_covariance_values():
    g = _gen(0)
    iso = torch.randn(4096, 16, generator=g)
    v, c = variance_covariance(iso)
    assert v < 0.05 and c < 0.05
    v, c = variance_covariance(torch.ones(64, 16))
    assert v > 0.95  # the hinge at gamma = 1, std = sqrt(eps)
    corr = torch.randn(4096, 1, generator=g).expand(-1, 16)
    v, c = variance_covariance(corr)
    assert c > 10  # 16·15 off-diagonal entries ≈ 1, divided by 16
    with pytest.raises(ValueError, match="at least 2"):
        variance_covariance(torch.zeros(1, 4))


def test_effective_rank_and_latent_std():
    g = _gen(0)
    z = torch.randn(4096, 64, generator=g)
    assert 60 < effective_rank(z) <= 64
    rank1 = torch.randn(4096, 1, generator=g) @ torch.randn(1, 64, generator=g)
    assert effective_rank(rank1) == pytest.approx(1.0, abs=1e-3)
    assert effective_rank(torch.zeros(8, 4)) == 0.0
    assert latent_std(z) == pytest.approx(float(z.std(0).mean()))
    assert latent_std(3 * z) == pytest.approx(3.0, rel=0.05)


def test_no_grad_diagnostics_do_not_track():
    z = torch.randn(32, 4, requires_grad=True)
    assert isinstance(effective_rank(z), float) and isinstance(latent_std(z), float)


# --------------------------------------------------------------------------------------------
# data-parallel correctness: 2 gloo processes vs one process on the full batch
# --------------------------------------------------------------------------------------------

WORLD = 2
N_FULL, D_IN, D = 48, 5, 6
SPLITS = {"even": (0, 24, 48), "uneven": (0, 31, 48)}  # row boundaries per rank
SIG = dict(num_projections=16, num_points=17)


def _fixed_batch() -> tuple[torch.Tensor, torch.Tensor, torch.nn.Linear]:
    g = _gen(1234)
    z = 0.7 * torch.randn(N_FULL, D, generator=g, dtype=torch.float64) + 0.2
    x = torch.randn(N_FULL, D_IN, generator=g, dtype=torch.float64)
    enc = torch.nn.Linear(D_IN, D).double()
    with torch.no_grad():
        enc.weight.copy_(torch.randn(D, D_IN, generator=g, dtype=torch.float64))
        enc.bias.copy_(torch.randn(D, generator=g, dtype=torch.float64))
    return z, x, enc


def _vc_total(z: torch.Tensor) -> torch.Tensor:
    v, c = variance_covariance(z)
    return v + 0.5 * c


def _single_process_reference() -> dict[str, np.ndarray]:
    z, x, enc = _fixed_batch()
    out: dict[str, np.ndarray] = {}
    zz = z.clone().requires_grad_(True)
    loss = sigreg(zz, generator=_gen(99), **SIG)
    loss.backward()
    out["sig_loss"], out["sig_grad"] = loss.detach().numpy(), zz.grad.numpy()
    zz = z.clone().requires_grad_(True)
    v, c = variance_covariance(zz)
    (v + 0.5 * c).backward()
    out["vc_loss"] = torch.stack([v, c]).detach().numpy()
    out["vc_grad"] = zz.grad.numpy()
    enc.zero_grad()
    h = enc(x)
    (sigreg(h, generator=_gen(5), **SIG) + _vc_total(h)).backward()
    out["ddp_wgrad"] = enc.weight.grad.numpy().copy()
    out["ddp_bgrad"] = enc.bias.grad.numpy().copy()
    return out


def _ddp_worker(rank: int, store_path: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )
    try:
        z, x, enc = _fixed_batch()
        res: dict[str, np.ndarray] = {}
        for name, bounds in SPLITS.items():
            lo, hi = bounds[rank], bounds[rank + 1]
            zl = z[lo:hi].clone().requires_grad_(True)
            loss = sigreg(zl, generator=_gen(99), check_consistent=True, **SIG)
            loss.backward()
            res[f"{name}_sig_loss"], res[f"{name}_sig_grad"] = loss.detach().numpy(), zl.grad.numpy()
            zl = z[lo:hi].clone().requires_grad_(True)
            v, c = variance_covariance(zl)
            (v + 0.5 * c).backward()
            res[f"{name}_vc_loss"] = torch.stack([v, c]).detach().numpy()
            res[f"{name}_vc_grad"] = zl.grad.numpy()

        # End to end: a DDP-wrapped encoder; DDP averages the parameter gradients.
        lo, hi = SPLITS["uneven"][rank], SPLITS["uneven"][rank + 1]
        model = DDP(enc)
        h = model(x[lo:hi])
        (sigreg(h, generator=_gen(5), **SIG) + _vc_total(h)).backward()
        res["ddp_wgrad"] = model.module.weight.grad.numpy().copy()
        res["ddp_bgrad"] = model.module.bias.grad.numpy().copy()

        # Generators seeded by rank: the consistency check must raise on every rank.
        try:
            sigreg(z[:4], generator=_gen(rank), check_consistent=True, **SIG)
            res["mismatch_raised"] = np.array(False)
        except RuntimeError as err:
            res["mismatch_raised"] = np.array("differ between ranks" in str(err))
        # No generator under distributed is refused (no collective happens before the error).
        try:
            sigreg(z[:4], **SIG)
            res["no_generator_raised"] = np.array(False)
        except ValueError:
            res["no_generator_raised"] = np.array(True)
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), **res)
        dist.barrier()  # neither rank tears gloo down while the other still talks to it (a SIGABRT under load)
    finally:
        dist.destroy_process_group()


def test_ddp_matches_single_process(tmp_path):
    """Two gloo ranks, each holding a slice of one fixed batch (an even and an uneven split).

    (a) Every rank's loss equals the single-process loss on the full batch.
    (b) Each rank's gradient on its rows equals world_size × the matching rows of the
        single-process gradient: the autograd all-reduce sums the gradients of every rank's
        copy of the loss. DDP then averages parameter gradients over the ranks, and
    (c) the parameter gradients of a DDP-wrapped encoder equal the single-process ones.
    (d) Rank-seeded generators are caught by check_consistent, and generator=None is
        refused.
    The ranks are spawned once here, not per check, because each spawn costs a torch import.
    """
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = []
    for r in range(WORLD):
        with np.load(tmp_path / f"rank{r}.npz") as f:
            ranks.append({k: f[k] for k in f.files})
    ref = _single_process_reference()

    for rank, res in enumerate(ranks):
        for split, bounds in SPLITS.items():
            lo, hi = bounds[rank], bounds[rank + 1]
            for kind in ("sig", "vc"):
                where = f"rank {rank}, {split} split, {kind}"
                np.testing.assert_allclose(
                    res[f"{split}_{kind}_loss"], ref[f"{kind}_loss"], rtol=1e-10, atol=1e-12,
                    err_msg=f"loss differs from single process ({where})",
                )
                np.testing.assert_allclose(
                    res[f"{split}_{kind}_grad"], WORLD * ref[f"{kind}_grad"][lo:hi],
                    rtol=1e-9, atol=1e-12, err_msg=f"local-row gradient is wrong ({where})",
                )
        for name in ("ddp_wgrad", "ddp_bgrad"):
            np.testing.assert_allclose(
                res[name], ref[name], rtol=1e-9, atol=1e-12,
                err_msg=f"DDP parameter gradient differs from single process (rank {rank})",
            )
        assert bool(res["mismatch_raised"]), f"rank {rank}: mismatched directions not caught"
        assert bool(res["no_generator_raised"]), f"rank {rank}: generator=None not refused"


def test_single_process_ignores_check_consistent():
    z = torch.randn(32, 4, generator=_gen(0))
    assert torch.equal(sigreg(z, 8, _gen(1), check_consistent=True), sigreg(z, 8, _gen(1)))
