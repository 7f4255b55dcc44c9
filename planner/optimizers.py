"""Optimizers over action plans [H, K, A]: one sampling loop for CEM and MPPI, and nevergrad.

    optimize(objective, init: Proposal, generator) -> PlanResult

CEM and MPPI differ only in how they refit the sampling distribution (the elites' mean and std,
or a softmax-weighted mean and std), so they share `SamplingOptimizer`. Every optimizer is
anytime: it stops after `iterations` or once `budget_ms` has passed, whichever comes first, and
returns the best plan it evaluated.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

REFITS = ("cem", "mppi")


@dataclass
class Proposal:
    """Where the search starts: a Gaussian (mean, std [H, K, A]) and fixed candidates [N, H, K, A]
    (the VLA's chunks, say) that are evaluated in the first iteration."""

    mean: torch.Tensor
    std: torch.Tensor
    samples: torch.Tensor | None = None


@dataclass
class PlanResult:
    actions: torch.Tensor  # [H, K, A], the best plan evaluated
    cost: float  # its cost
    candidates: torch.Tensor  # [M, H, K, A] of the last iteration
    costs: torch.Tensor  # [M]
    iterations: int
    evaluations: int  # imagined rollouts in all
    time_ms: float


@dataclass
class SamplerConfig:
    refit: str = "cem"  # cem | mppi
    population: int = 256  # Gaussian samples per iteration
    iterations: int = 3
    elites: int = 32  # cem: how many of the lowest costs the refit keeps
    temperature: float = 0.5  # mppi: in units of the population's cost std
    momentum: float = 0.1  # of the old mean in the refit
    min_std: float = 0.05
    budget_ms: float | None = None  # anytime deadline (at least one iteration always runs)
    low: float = -1.0  # action bounds
    high: float = 1.0

    def __post_init__(self):
        if self.refit not in REFITS:
            raise ValueError(f"unknown refit {self.refit!r}; choose cem or mppi")
        if self.iterations < 1 or self.population < 0:
            raise ValueError("iterations must be ≥ 1 and population ≥ 0")
        if self.refit == "cem" and self.elites < 1:
            raise ValueError("cem needs elites ≥ 1")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


class _Best:
    """The lowest-cost plan seen so far (non-finite costs never win)."""

    def __init__(self):
        self.cost, self.actions = math.inf, None

    def update(self, candidates: torch.Tensor, costs: torch.Tensor) -> None:
        i = int(torch.argmin(costs))
        if float(costs[i]) < self.cost:
            self.cost, self.actions = float(costs[i]), candidates[i].clone()


def _finite(costs: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(costs), costs, torch.full_like(costs, math.inf))


class SamplingOptimizer:
    """Sample around a Gaussian, score, refit (CEM or MPPI), repeat."""

    def __init__(self, cfg: SamplerConfig | None = None):
        self.cfg = cfg or SamplerConfig()

    def refit(self, candidates: torch.Tensor, costs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """candidates [M, H, K, A], finite-or-inf costs [M] -> (mean, std) [H, K, A]."""
        cfg = self.cfg
        ok = torch.isfinite(costs)
        candidates, costs = candidates[ok], costs[ok]
        if cfg.refit == "cem":
            elites = candidates[torch.topk(costs, min(cfg.elites, len(costs)), largest=False).indices]
            return elites.mean(0), elites.std(0, unbiased=False)
        spread = costs.std(unbiased=False) if len(costs) > 1 else costs.new_tensor(1.0)
        w = torch.softmax(-(costs - costs.min()) / (cfg.temperature * spread + 1e-8), dim=0)
        mean = torch.einsum("m,m...->...", w, candidates)
        var = torch.einsum("m,m...->...", w, (candidates - mean).pow(2))
        return mean, var.sqrt()

    @torch.no_grad()
    def optimize(self, objective, init: Proposal, generator: torch.Generator | None = None) -> PlanResult:
        cfg = self.cfg
        start = time.perf_counter()
        mean, std = init.mean.clone(), init.std.clone()
        best = _Best()
        evaluations, iteration = 0, 0
        for iteration in range(1, cfg.iterations + 1):
            noise = torch.randn((cfg.population, *mean.shape), generator=generator, dtype=mean.dtype)
            parts = [mean[None], (mean + std * noise).clamp(cfg.low, cfg.high)]
            if iteration == 1 and init.samples is not None:
                parts.insert(0, init.samples.to(mean.dtype))
            candidates = torch.cat(parts)
            costs = _finite(objective(candidates))
            evaluations += len(candidates)
            best.update(candidates, costs)
            if torch.isfinite(costs).any():
                new_mean, new_std = self.refit(candidates, costs)
                mean = cfg.momentum * mean + (1 - cfg.momentum) * new_mean
                std = new_std.clamp_min(cfg.min_std)
            if cfg.budget_ms is not None and (time.perf_counter() - start) * 1e3 >= cfg.budget_ms:
                break
        return PlanResult(actions=best.actions if best.actions is not None else mean, cost=best.cost,
                          candidates=candidates, costs=costs, iterations=iteration, evaluations=evaluations,
                          time_ms=(time.perf_counter() - start) * 1e3)


class NevergradOptimizer:
    """Any nevergrad optimizer by its registry name ("CMA", "TwoPointsDE", "NGOpt", ...), asked for
    `batch` plans at a time so that the world model scores them in one batched rollout."""

    def __init__(self, name: str = "CMA", evaluations: int = 768, batch: int = 256,
                 budget_ms: float | None = None, low: float = -1.0, high: float = 1.0):
        import nevergrad as ng

        if name not in ng.optimizers.registry:
            raise ValueError(f"nevergrad has no optimizer named {name!r}; see "
                             "sorted(nevergrad.optimizers.registry) for the names")
        if evaluations < 1 or batch < 1:
            raise ValueError("evaluations and batch must be ≥ 1")
        self.name, self.evaluations, self.batch = name, evaluations, batch
        self.budget_ms, self.low, self.high = budget_ms, low, high

    @torch.no_grad()
    def optimize(self, objective, init: Proposal, generator: torch.Generator | None = None) -> PlanResult:
        import nevergrad as ng

        start = time.perf_counter()
        shape = tuple(init.mean.shape)
        with warnings.catch_warnings():  # "bounds are N sigma away": a hint, and it would flood every replan
            warnings.simplefilter("ignore", ng.errors.NevergradRuntimeWarning)
            param = ng.p.Array(init=init.mean.numpy().astype(np.float64)).set_bounds(self.low, self.high)
            param.set_mutation(sigma=float(init.std.mean()))
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        param.random_state = np.random.RandomState(seed)
        opt = ng.optimizers.registry[self.name](parametrization=param, budget=self.evaluations,
                                                num_workers=self.batch)
        if init.samples is not None:
            for s in init.samples.numpy().astype(np.float64):
                opt.suggest(s)
        best, done, rounds = _Best(), 0, 0
        while done < self.evaluations:
            asked = [opt.ask() for _ in range(min(self.batch, self.evaluations - done))]
            candidates = torch.from_numpy(np.stack([a.value for a in asked])).to(init.mean.dtype)
            costs = _finite(objective(candidates.view(-1, *shape)))
            for a, c in zip(asked, costs.tolist()):
                opt.tell(a, c if math.isfinite(c) else 1e30)
            best.update(candidates, costs)
            done, rounds = done + len(asked), rounds + 1
            if self.budget_ms is not None and (time.perf_counter() - start) * 1e3 >= self.budget_ms:
                break
        return PlanResult(actions=best.actions if best.actions is not None else init.mean, cost=best.cost,
                          candidates=candidates, costs=costs, iterations=rounds, evaluations=done,
                          time_ms=(time.perf_counter() - start) * 1e3)
