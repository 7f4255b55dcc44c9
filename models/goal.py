"""Where the instruction wants the world to end up, in the world model's latent space.

    GoalModel.goal(ℓ, z_now)     -> z_goal             regressed onto sg[f̄(o_T)] of successful episodes
    GoalModel.predict(ℓ, z_now)  -> z_goal, log σ²     with `variance`: a Gaussian over the final latent
    GoalModel.score(z, ℓ)        -> how well z fulfils ℓ (higher is better), trained contrastively
    GoalModel.steps_to_go(z, ℓ)  -> with `to_go`: steps until success from z, regressed on the
                                    remaining steps of every frame of successful episodes

The goal is a residual on z_now: most of the scene (objects the instruction does not name) ends
where it started, so the network only has to say what moves. With `variance` it also says, per
latent dimension, how tightly the instruction pins the final state down (trained by Gaussian
negative log-likelihood): the named object's place on its pad is pinned, where the pusher comes to
rest beside it is not. The planner's `nll` distance weighs each dimension by that precision.
A distance to the end state is a poor guide over a short horizon (a push starts by going round the
object, away from where everything ends); steps-to-go is a learned cost-to-go that says how much
closer to done a state is, and the planner's goal=to_go minimises it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .world_model import LANG_DIM


@dataclass
class GoalModelConfig:
    latent_dim: int = 128  # D, the world model's
    width: int = 512
    critic_dim: int = 128
    temperature: float = 0.1  # of the critic's InfoNCE
    variance: bool = False  # also predict log σ² per dimension of the final latent (Gaussian NLL)
    dropout: float = 0.0  # in the goal network: ~3k successful episodes are few for 640 inputs
    to_go: bool = False  # also learn steps_to_go(z, ℓ)

    def to_dict(self) -> dict:
        return asdict(self)


TO_GO_SCALE = 10.0  # steps per unit of the head's output (one second at 10 Hz)
# log σ² is kept in a range where the NLL stays well conditioned (σ from 0.02 to 7 latent units).
LOG_VAR_RANGE = (-8.0, 4.0)


def _mlp(inp: int, width: int, out: int, dropout: float = 0.0) -> nn.Sequential:
    # Dropout layers only where asked for, so checkpoints without them keep their parameter names.
    drop = [nn.Dropout(dropout)] if dropout else []
    return nn.Sequential(nn.Linear(inp, width), nn.SiLU(), *drop, nn.Linear(width, width), nn.SiLU(), *drop,
                         nn.Linear(width, out))


class GoalModel(nn.Module):
    def __init__(self, cfg: GoalModelConfig):
        super().__init__()
        self.cfg = cfg
        out = 2 * cfg.latent_dim if cfg.variance else cfg.latent_dim
        self.goal_net = _mlp(LANG_DIM + cfg.latent_dim, cfg.width, out, cfg.dropout)
        self.critic_z = _mlp(cfg.latent_dim, cfg.width, cfg.critic_dim)
        self.critic_lang = _mlp(LANG_DIM, cfg.width, cfg.critic_dim)
        self.to_go_net = _mlp(LANG_DIM + cfg.latent_dim, cfg.width, 1, cfg.dropout) if cfg.to_go else None

    @classmethod
    def load(cls, directory) -> "GoalModel":
        """The goal model `foresight-train target=goal` saved in `directory`, in eval mode."""
        from .checkpoint import load_model
        return load_model(directory, "goal", lambda c: cls(GoalModelConfig(**c)))

    def goal(self, lang: torch.Tensor, z_now: torch.Tensor) -> torch.Tensor:
        """lang [B, L], z_now [B, D] -> z_goal [B, D]."""
        return self.predict(lang, z_now)[0]

    def predict(self, lang: torch.Tensor, z_now: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """lang [B, L], z_now [B, D] -> the final latent's mean [B, D] and log σ² [B, D] (zeros,
        i.e. unit variance, without `variance`)."""
        out = self.goal_net(torch.cat([lang, z_now], dim=-1))
        if not self.cfg.variance:
            return z_now + out, torch.zeros_like(z_now)
        delta, log_var = out.chunk(2, dim=-1)
        return z_now + delta, log_var.clamp(*LOG_VAR_RANGE)

    def score(self, z: torch.Tensor, lang: torch.Tensor) -> torch.Tensor:
        """z [B, D], lang [B, L] (or [1, L]) -> [B]: cosine similarity / temperature."""
        return (self._embed_z(z) * self._embed_lang(lang)).sum(-1) / self.cfg.temperature

    def steps_to_go(self, z: torch.Tensor, lang: torch.Tensor) -> torch.Tensor:
        """z [B, D], lang [B, L] (or [1, L]) -> [B]: predicted steps until ℓ is fulfilled."""
        if self.to_go_net is None:
            raise ValueError("this goal model has no steps-to-go head; train one with +target.model.to_go=true")
        return self.to_go_net(torch.cat([lang.expand(len(z), -1), z], dim=-1))[:, 0] * TO_GO_SCALE

    def _embed_z(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.critic_z(z), dim=-1)

    def _embed_lang(self, lang: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.critic_lang(lang), dim=-1)

    def forward(self, lang: torch.Tensor, instruction_ids: torch.Tensor, z_now: torch.Tensor,
                z_final: torch.Tensor, to_go: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The training losses (use `predict`, `score` and `steps_to_go` for inference) on a batch of
        successful episodes (latents from the frozen target encoder).

        lang [B, L]; instruction_ids [B] (equal ids = the same instruction text, so that duplicates
        in a batch are positives, not negatives); z_now [B, D] a frame of the episode; z_final [B, D]
        its last frame; to_go [B] the steps from z_now to that last frame. Returns goal (MSE, or
        with `variance` the Gaussian NLL per dimension), critic (InfoNCE over the batch's
        instructions plus a ranking term: the final state must outscore the current one), with
        `to_go` its Huber loss, and their sum, loss.
        """
        mean, log_var = self.predict(lang, z_now)
        goal = (gaussian_nll(z_final, mean, log_var) / mean.shape[-1]).mean() if self.cfg.variance \
            else F.mse_loss(mean, z_final)
        logits = self._embed_z(z_final) @ self._embed_lang(lang).T / self.cfg.temperature  # [B, B]
        positive = (instruction_ids[:, None] == instruction_ids[None, :]).float()
        nce = -(torch.log_softmax(logits, dim=1) * positive / positive.sum(1, keepdim=True)).sum(1).mean()
        later = F.softplus(self.score(z_now, lang) - self.score(z_final, lang)).mean()
        critic = nce + later
        out = {"loss": goal + critic, "goal": goal, "critic_nce": nce, "critic_order": later}
        if self.to_go_net is not None:
            out["to_go"] = F.smooth_l1_loss(self.steps_to_go(z_now, lang) / TO_GO_SCALE, to_go.float() / TO_GO_SCALE)
            out["loss"] = out["loss"] + out["to_go"]
        return out


def gaussian_nll(z: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """-log N(z; mean, diag σ²) up to its constant, summed over the last dimension: [..., D] -> [...]."""
    return 0.5 * ((z - mean) ** 2 * torch.exp(-log_var) + log_var).sum(-1)
