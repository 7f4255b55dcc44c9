"""What the planner minimises: candidates [M, H, K, A] -> costs [M], from imagined latents only.

    ẑ_1..ẑ_H = g_φ(z_hist, candidate, ℓ)                       the world model's rollout
    cost     = d(ẑ_H, goal)                                       terminal
             + running_weight · mean_k d(ẑ_k, goal), k < H        optional running cost
             + prior_weight · min_n ‖a_0 − vla_n‖² / (K·A)         optional VLA prior

The goal is a latent (from the goal model G(ℓ, z_now), or an encoded goal image) compared by
`distance`, or the language critic, whose score is negated. The `nll` distance is the negative
log-likelihood of ẑ under the goal model's Gaussian over final latents, so dimensions the
instruction pins down weigh more; a goal without a variance gives it unit variance (half the squared
L2). Nothing here reads the simulator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.goal import gaussian_nll

DISTANCES = ("l2", "l1", "cosine", "nll")


@dataclass
class CostConfig:
    distance: str = "l2"  # l2 | l1 | cosine | nll, between an imagined latent and the goal latent
    running_weight: float = 0.0  # weight of the intermediate latents' mean distance to the goal
    prior_weight: float = 10.0  # pull the first chunk towards the nearest VLA proposal (where there are any)

    def __post_init__(self):
        if self.distance not in DISTANCES:
            raise ValueError(f"unknown distance {self.distance!r}; choose one of {', '.join(DISTANCES)}")
        if self.running_weight < 0 or self.prior_weight < 0:
            raise ValueError("running_weight and prior_weight must be ≥ 0")


def latent_distance(z: torch.Tensor, goal: torch.Tensor, kind: str, log_var: torch.Tensor | None = None) -> torch.Tensor:
    """z [..., D], goal [D] (log_var [D]: the goal's log σ², used by nll) -> [...]."""
    if kind == "nll":
        return gaussian_nll(z, goal, torch.zeros_like(goal) if log_var is None else log_var)
    if kind == "l2":
        return (z - goal).norm(dim=-1)
    if kind == "l1":
        return (z - goal).abs().mean(dim=-1)
    return 1.0 - F.cosine_similarity(z, goal.expand_as(z), dim=-1)


@dataclass
class Goal:
    """Either a goal latent [D] (with the goal model's log σ² [D] where it has one) or a critic:
    score(z [M, D]) -> [M], higher is better."""

    latent: torch.Tensor | None = None
    critic: object = None  # Callable[[Tensor], Tensor]
    log_var: torch.Tensor | None = None

    @classmethod
    def from_model(cls, goal_model, lang: torch.Tensor, z_now: torch.Tensor, kind: str = "model") -> "Goal":
        """The goal for one observation (lang [1, L], z_now [1, D]) from the goal model. kind model:
        its prediction of the final latent (with log σ² where it has one); critic: the language
        critic's score; value: minus the steps-to-go its value implies."""
        if kind == "critic":
            return cls(critic=lambda z: goal_model.score(z, lang))
        if kind == "value":
            return cls(critic=lambda z: -goal_model.steps_to_go(z, lang))
        if kind != "model":
            raise ValueError(f"unknown goal {kind!r}; choose model, critic or value")
        mean, log_var = goal_model.predict(lang, z_now)
        return cls(latent=mean[0], log_var=log_var[0])

    @classmethod
    def from_done(cls, done_model, clauses: torch.Tensor) -> "Goal":
        """The done model as a critic: the log-probability that every clause [C, L] of the
        instruction holds in the frame of z."""
        return cls(critic=lambda z: sum(F.logsigmoid(done_model.logit(z, clause[None])) for clause in clauses))

    def __post_init__(self):
        if (self.latent is None) == (self.critic is None):
            raise ValueError("a Goal needs exactly one of latent (a goal embedding) or critic (a scorer)")

    def cost(self, z: torch.Tensor, distance: str) -> torch.Tensor:
        """z [..., D] -> [...], lower is better."""
        if self.latent is not None:
            return latent_distance(z, self.latent, distance, self.log_var)
        return -self.critic(z.reshape(-1, z.shape[-1])).view(z.shape[:-1])


class Objective:
    """The cost of candidate plans from one observation (history) under one instruction.

    world_model: anything with rollout(z_hist [M, h, D], chunks [M, H, K, A], lang [1, L]) -> [M, H, D];
    z_hist [1, h, D]; lang [1, L]; prior: the VLA's chunks [N, K, A] for the prior term.
    Counts the imagined rollouts it evaluates (`evaluations`) and keeps the latents of the last
    call (`last_latents` [M, H, D]).
    """

    def __init__(self, world_model, z_hist: torch.Tensor, lang: torch.Tensor, goal: Goal,
                 cfg: CostConfig | None = None, prior: torch.Tensor | None = None):
        self.world_model, self.z_hist, self.lang, self.goal = world_model, z_hist, lang, goal
        self.cfg = cfg or CostConfig()
        self.prior = prior
        self.evaluations = 0
        self.last_latents: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self, candidates: torch.Tensor) -> torch.Tensor:
        """candidates [M, H, K, A] -> costs [M]."""
        if candidates.ndim != 4:
            raise ValueError(f"candidates must be [M, H, K, A], got {list(candidates.shape)}")
        m = len(candidates)
        z = self.world_model.rollout(self.z_hist.expand(m, -1, -1), candidates, self.lang)
        self.evaluations += m
        self.last_latents = z
        cost = self.goal.cost(z[:, -1], self.cfg.distance)
        if self.cfg.running_weight and z.shape[1] > 1:
            cost = cost + self.cfg.running_weight * self.goal.cost(z[:, :-1], self.cfg.distance).mean(1)
        if self.cfg.prior_weight and self.prior is not None:
            gap = (candidates[:, None, 0] - self.prior[None]).pow(2).flatten(2).mean(-1)  # [M, N]
            cost = cost + self.cfg.prior_weight * gap.min(1).values
        return cost
