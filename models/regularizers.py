"""Anti-collapse regularizers for the JEPA world model, and two collapse diagnostics.

- :func:`sigreg`: SIGReg (Sketched Isotropic Gaussian Regularization; LeJEPA, Balestriero &
  LeCun 2025, as used by LeWorldModel): random 1-D projections of the embeddings, each tested
  against N(0, 1) with the Epps–Pulley characteristic-function statistic.
- :func:`variance_covariance`: the VICReg variance hinge and covariance penalty, for the
  EMA-target variant of the world model.
- :func:`effective_rank`, :func:`latent_std`: no-grad diagnostics to log during training.

Data-parallel training
----------------------
Both losses are statistics of the whole batch. Under ``DistributedDataParallel`` each rank
holds only a slice, so when ``torch.distributed`` is initialised they all-reduce their
per-rank *sums* (never the samples) and compute the loss of the GLOBAL batch. This makes the
loss on every rank equal to the single-process loss on the concatenated batch, and it also
works when ranks hold different numbers of rows.

The all-reduce is autograd-aware. Its backward is again a sum all-reduce, the same rule as in
``torch.distributed.nn.functional.all_reduce`` and in the autograd kernel of
``torch.distributed._functional_collectives.all_reduce``. So the gradient on a rank's local
rows is ``world_size`` times the matching rows of the single-process gradient: it gathers
the gradient of every rank's copy of the loss. DDP then *averages* the parameter gradients
over ranks, and the result is exactly the single-process gradient of the global loss. The
same rule is used by VICReg's ``FullGatherLayer`` and by ``all_gather``-based contrastive
losses. Do not divide the loss by the world size; DDP's averaging already does that.

Without an initialised process group nothing is communicated. The code path is the same, and
the values are the single-process ones.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["sigreg", "variance_covariance", "effective_rank", "latent_std"]


# --------------------------------------------------------------------------------------------
# distributed helpers
# --------------------------------------------------------------------------------------------


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class _AllReduceSum(torch.autograd.Function):
    """Sum all-reduce whose backward sums the incoming gradients across ranks.

    Same semantics as ``torch.distributed.nn.functional.all_reduce`` (op=SUM). That function
    is deprecated in torch 2.13 and warns on every call. Its suggested replacement,
    ``torch.distributed._functional_collectives.all_reduce``, is private and only
    differentiable in recent torch versions. This Function is a few lines, behaves the same
    on every torch version the project supports, and emits no warning.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # type: ignore[override]
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad_output.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def _all_reduce_sum(x: Tensor) -> Tensor:
    return _AllReduceSum.apply(x) if _distributed() else x


def _check_same_on_all_ranks(directions: Tensor) -> None:
    """Raise on every rank if the projection directions differ between ranks.

    Costs one all-reduce of two numbers. Every rank sees the same max and min, so either all
    ranks raise or none does, and the process group stays in step.
    """
    flat = directions.detach().to(torch.float64).flatten()
    # Position-weighted checksum: column order matters because the per-direction sums are
    # added column by column across ranks.
    pos = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64, device=flat.device)
    c = (flat * pos).sum()
    both = torch.stack([c, -c])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    c_max, c_min = both[0].item(), -both[1].item()
    if abs(c_max - c_min) > 1e-6 * (1.0 + abs(c_max)):
        raise RuntimeError(
            "sigreg: the random projection directions differ between ranks (checksum range "
            f"[{c_min:.9g}, {c_max:.9g}]). The global statistic needs the same directions "
            "everywhere: pass a torch.Generator seeded identically on every rank, e.g. "
            "torch.Generator().manual_seed(base_seed + step), not one seeded by rank."
        )


# --------------------------------------------------------------------------------------------
# SIGReg
# --------------------------------------------------------------------------------------------


def _check_2d(z: Tensor, name: str) -> None:
    if not isinstance(z, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape [N, D], got {type(z).__name__}")
    if z.ndim != 2:
        raise ValueError(
            f"{name}: expected embeddings of shape [N, D], got shape {tuple(z.shape)}. Flatten "
            "leading dimensions with z.reshape(-1, z.shape[-1]), or call once per time step."
        )
    if not z.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {z.dtype}")


def _compute_dtype(z: Tensor) -> torch.dtype:
    # Half precision is too coarse for cos/sin sums and covariances; compute in float32.
    return torch.float32 if z.dtype in (torch.float16, torch.bfloat16) else z.dtype


def _quadrature(
    num_points: int, t_max: float, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """Nodes t_k on [0, t_max], φ(t_k) = exp(-t_k²/2), and weights for ∫_{-t_max}^{t_max}.

    The integrand is even in t, so the trapezoid rule on the symmetric grid {-t_K..t_K} folds
    onto t >= 0 with weights dt at t = 0 and t = t_max and 2·dt in between. The Gaussian
    weight w(t) = exp(-t²/2) is folded into the returned weights.
    """
    t = torch.linspace(0.0, t_max, num_points, dtype=torch.float64)
    dt = t_max / (num_points - 1)
    trap = torch.full((num_points,), 2.0 * dt, dtype=torch.float64)
    trap[0] = dt
    trap[-1] = dt
    phi = torch.exp(-0.5 * t.square())
    weights = trap * phi
    return (t.to(device, dtype), phi.to(device, dtype), weights.to(device, dtype))


def _random_directions(
    dim: int, num: int, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """``num`` random unit vectors in R^dim as the columns of a [dim, num] matrix."""
    draw_device = generator.device if generator is not None else device
    a = torch.randn(dim, num, generator=generator, device=draw_device, dtype=torch.float32)
    a = a.to(device=device, dtype=dtype)
    return a / a.norm(dim=0, keepdim=True)


def sigreg(
    z: Tensor,
    num_projections: int = 256,
    generator: torch.Generator | None = None,
    num_points: int = 17,
    t_max: float = 3.0,
    *,
    check_consistent: bool = False,
) -> Tensor:
    """SIGReg: the sliced Epps–Pulley statistic of ``z`` against N(0, I).

    Draws ``num_projections`` directions a_p, fresh on every call from ``generator``, and
    projects x_ip = <z_i, a_p>. For each projection it compares the empirical characteristic
    function φ̂_p(t) = (1/N) Σ_i exp(i t x_ip) with the N(0, 1) one, φ(t) = exp(-t²/2):

        T_p = N · ∫_{-t_max}^{t_max} |φ̂_p(t) - φ(t)|² · exp(-t²/2) dt
            ≈ N · Σ_k w_k [ (mean_i cos(t_k x_ip) - φ(t_k))² + (mean_i sin(t_k x_ip))² ]

    with the folded trapezoid rule on ``num_points`` nodes t_k in [0, t_max] (see
    :func:`_quadrature`). The result is mean_p T_p. The factor N is the global batch size, as
    in the published LeJEPA / LeWorldModel code. Under the null hypothesis (rows i.i.d.
    N(0, I)), N·E|φ̂ - φ|² = 1 - φ(t)² for every N. So the expected value,
    Σ_k w_k (1 - φ(t_k)²) ≈ 1.06 with the defaults, does not depend on the batch size, and
    any departure from N(0, I) grows linearly with N. A collapsed or badly scaled batch
    scores O(N).

    Args:
        z: embeddings, shape [N, D], floating point; differentiable.
        num_projections: the number of random directions.
        generator: the source of the directions. Under ``torch.distributed`` every rank must
            draw the SAME directions: pass a generator seeded identically on all ranks (e.g.
            ``torch.Generator().manual_seed(seed + step)``). A CPU generator gives the same
            directions on every device. ``None`` uses torch's global RNG and is refused
            under distributed training.
        num_points: the quadrature nodes on [0, t_max] (>= 2).
        t_max: the integration range [-t_max, t_max].
        check_consistent: under ``torch.distributed``, all-reduce a checksum of the
            directions and raise on every rank if the ranks disagree (one tiny collective).
            This does nothing in a single process.

    Returns:
        A 0-dim tensor, in float32 for half-precision input and in ``z.dtype`` otherwise.
        Under ``torch.distributed`` it is the statistic of the global batch (all ranks' rows),
        identical on every rank; see the module docstring for the gradient convention.
    """
    _check_2d(z, "sigreg")
    if num_projections < 1:
        raise ValueError(f"sigreg: num_projections must be >= 1, got {num_projections}")
    if num_points < 2:
        raise ValueError(f"sigreg: num_points must be >= 2 (trapezoid rule), got {num_points}")
    if not t_max > 0:
        raise ValueError(f"sigreg: t_max must be > 0, got {t_max}")
    distributed = _distributed()
    if distributed and generator is None:
        raise ValueError(
            "sigreg: under torch.distributed every rank must draw the same projections; pass "
            "generator=torch.Generator().manual_seed(seed + step), seeded identically on all "
            "ranks."
        )
    n_local, dim = z.shape
    if n_local == 0 and not distributed:
        raise ValueError("sigreg: got an empty batch (N = 0)")

    dtype = _compute_dtype(z)
    x = z.to(dtype)
    directions = _random_directions(dim, num_projections, generator, z.device, dtype)
    if check_consistent and distributed:
        _check_same_on_all_ranks(directions)
    t, phi, weights = _quadrature(num_points, t_max, z.device, dtype)

    xt = (x @ directions).unsqueeze(-1) * t  # [N, P, T]
    cos_sum = xt.cos().sum(0)  # [P, T]
    sin_sum = xt.sin().sum(0)  # [P, T]
    if distributed:
        # One collective for both sums and the count.
        count = torch.full((1,), float(n_local), device=z.device, dtype=dtype)
        packed = _all_reduce_sum(torch.cat([cos_sum.flatten(), sin_sum.flatten(), count]))
        size = cos_sum.numel()
        cos_sum = packed[:size].view_as(cos_sum)
        sin_sum = packed[size : 2 * size].view_as(sin_sum)
        n = packed[-1].detach()
        if n.item() < 1:
            raise ValueError("sigreg: the global batch is empty on all ranks (N = 0)")
    else:
        n = torch.tensor(float(n_local), device=z.device, dtype=dtype)

    err = (cos_sum / n - phi).square() + (sin_sum / n).square()  # [P, T]
    statistic = (err @ weights) * n  # [P]
    return statistic.mean()


# --------------------------------------------------------------------------------------------
# VICReg-style variance / covariance
# --------------------------------------------------------------------------------------------


def variance_covariance(z: Tensor, gamma: float = 1.0, eps: float = 1e-4) -> tuple[Tensor, Tensor]:
    """VICReg's variance and covariance terms for embeddings z of shape [N, D].

        var_loss = mean_d max(0, gamma - sqrt(Var[z_d] + eps))
        cov_loss = Σ_{d != e} Cov[z]_{de}² / D

    Var and Cov are the unbiased (N - 1) batch estimates. Under ``torch.distributed`` they
    are the estimates over the global batch. The mean is found first (one all-reduce of
    Σz and the count), then the centred scatter matrix Σ(z - mean)(z - mean)ᵀ is
    all-reduced. Two passes cost one extra tiny collective, but unlike Σzzᵀ - N·mean·meanᵀ
    they lose no precision when |mean| >> std. Both collectives are autograd-aware (see the
    module docstring).

    Returns:
        ``(var_loss, cov_loss)``, two 0-dim tensors.
    """
    _check_2d(z, "variance_covariance")
    if gamma < 0:
        raise ValueError(f"variance_covariance: gamma must be >= 0, got {gamma}")
    if eps < 0:
        raise ValueError(f"variance_covariance: eps must be >= 0, got {eps}")
    distributed = _distributed()
    n_local, dim = z.shape
    dtype = _compute_dtype(z)
    x = z.to(dtype)

    if distributed:
        count = torch.full((1,), float(n_local), device=z.device, dtype=dtype)
        packed = _all_reduce_sum(torch.cat([x.sum(0), count]))
        total, n = packed[:dim], packed[-1].detach()
        n_value = int(round(n.item()))
    else:
        total, n_value = x.sum(0), n_local
    if n_value < 2:
        raise ValueError(
            f"variance_covariance: need at least 2 samples in the (global) batch, got {n_value}"
        )
    centred = x - total / n_value
    scatter = _all_reduce_sum(centred.T @ centred)  # [D, D]
    cov = scatter / (n_value - 1)

    var = torch.diagonal(cov)
    std = torch.sqrt(var + eps)
    var_loss = torch.relu(gamma - std).mean()
    off_diag = cov - torch.diag_embed(var)
    cov_loss = off_diag.square().sum() / dim
    return var_loss, cov_loss


# --------------------------------------------------------------------------------------------
# diagnostics
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def effective_rank(z: Tensor) -> float:
    """The effective rank of z [N, D]: exp of the entropy of its normalised singular values.

    p_i = σ_i / Σ_j σ_j, erank = exp(-Σ_i p_i log p_i) (Roy & Vetterli 2007; RankMe, Garrido
    et al. 2023). z is not centred, as in RankMe. The value lies between 1 and min(N, D):
    ≈ D for isotropic data with N >> D, and 1 for rank-1 data (a fully collapsed batch).
    An all-zero matrix gives 0. This is computed on the local rows only, with no gradient.
    """
    _check_2d(z, "effective_rank")
    x = z.detach().to(torch.float64 if z.dtype == torch.float64 else torch.float32)
    if x.numel() == 0:
        raise ValueError(f"effective_rank: got an empty tensor of shape {tuple(z.shape)}")
    s = torch.linalg.svdvals(x)
    total = s.sum()
    if not torch.isfinite(total):
        raise ValueError("effective_rank: z contains non-finite values")
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def latent_std(z: Tensor) -> float:
    """The mean over dimensions of the per-dimension (unbiased) batch std of z [N, D].

    ≈ 1 for N(0, I) embeddings and → 0 under collapse. Computed on the local rows only.
    """
    _check_2d(z, "latent_std")
    if z.shape[0] < 2:
        raise ValueError(f"latent_std: need at least 2 samples, got {z.shape[0]}")
    return float(z.detach().to(_compute_dtype(z)).std(dim=0).mean())
