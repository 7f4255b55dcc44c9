"""Where the instruction wants the world to end up, in the world model's latent space.

    GoalModel.goal(ℓ, z_now)     -> z_goal             regressed onto sg[f̄(o_T)] of successful episodes
    GoalModel.predict(ℓ, z_now)  -> z_goal, log σ²     with `variance`: a Gaussian over the final latent
    GoalModel.score(z, ℓ)        -> how well z fulfils ℓ (higher is better), trained contrastively
    GoalModel.value(z, ℓ)        -> with `value`: γ^(steps until ℓ is fulfilled), 0 where it never
                                    is; learnt on every frame of every episode, failures included
    GoalModel.steps_to_go(z, ℓ)  -> the same in steps: log V / log γ

The goal is a residual on z_now: most of the scene (objects the instruction does not name) ends
where it started, so the network only has to say what moves. With `variance` it also says, per
latent dimension, how tightly the instruction pins the final state down (trained by Gaussian
negative log-likelihood): the named object's place on its pad is pinned, where the pusher comes to
rest beside it is not. The planner's `nll` distance weighs each dimension by that precision.
A distance to the end state is a poor guide over a short horizon (a push starts by going round the
object, away from where everything ends). The value is a learned cost-to-go: the Monte-Carlo return
of the data's behaviour, so it says how much closer to done a state is and, from the failed
episodes, which states lead nowhere. The planner's goal=value minimises steps_to_go.
"""

from __future__ import annotations

import math
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
    value: bool = False  # also learn value(z, ℓ), on all episodes (the goal and critic: successful ones)
    discount: float = 0.97  # γ of the value, per control step

    def to_dict(self) -> dict:
        return asdict(self)


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
        self.value_net = _mlp(LANG_DIM + cfg.latent_dim, cfg.width, 1, cfg.dropout) if cfg.value else None

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

    def value_logit(self, z: torch.Tensor, lang: torch.Tensor) -> torch.Tensor:
        """z [B, D], lang [B, L] (or [1, L]) -> [B]: the value's logit."""
        if self.value_net is None:
            raise ValueError("this goal model has no value head; train one with +target.model.value=true")
        return self.value_net(torch.cat([lang.expand(len(z), -1), z], dim=-1))[:, 0]

    def value(self, z: torch.Tensor, lang: torch.Tensor) -> torch.Tensor:
        """z [B, D], lang [B, L] (or [1, L]) -> [B] in (0, 1): γ^(steps until ℓ is fulfilled), in expectation."""
        return torch.sigmoid(self.value_logit(z, lang))

    def steps_to_go(self, z: torch.Tensor, lang: torch.Tensor) -> torch.Tensor:
        """z [B, D], lang [B, L] (or [1, L]) -> [B]: log V / log γ, the steps until ℓ is fulfilled
        where success is certain, more where it is in doubt."""
        return F.logsigmoid(self.value_logit(z, lang)) / math.log(self.cfg.discount)

    def _embed_z(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.critic_z(z), dim=-1)

    def _embed_lang(self, lang: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.critic_lang(lang), dim=-1)

    def forward(self, lang: torch.Tensor, instruction_ids: torch.Tensor, z_now: torch.Tensor,
                z_final: torch.Tensor, to_go: torch.Tensor | None = None, success: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The training losses (use `predict`, `score` and `value` for inference) on a batch of
        episode frames (latents from the frozen target encoder).

        lang [B, L]; instruction_ids [B] (equal ids = the same instruction text, so that duplicates
        in a batch are positives, not negatives); z_now [B, D] a frame of the episode; z_final [B, D]
        its last frame; to_go [B] the steps from z_now to that last frame; success [B] bool, whether
        the episode succeeded (None: all did). Returns goal (MSE, or with `variance` the Gaussian
        NLL per dimension) and critic (InfoNCE over the batch's instructions plus a ranking term:
        the final state must outscore the current one), both on the successful rows; with `value`
        its binary cross-entropy against γ^to_go (0 for failed episodes) on every row; and their
        sum, loss.
        """
        out = self._value_loss(lang, z_now, to_go, success) if self.value_net is not None else {}
        if success is not None:
            lang, instruction_ids, z_now, z_final = lang[success], instruction_ids[success], z_now[success], z_final[success]
        if not len(z_now):  # only failed episodes in this batch: nothing for the goal and critic to learn
            zero = torch.zeros(())
            return {"loss": out["value"], "goal": zero, "critic_nce": zero, "critic_order": zero, **out}
        mean, log_var = self.predict(lang, z_now)
        goal = (gaussian_nll(z_final, mean, log_var) / mean.shape[-1]).mean() if self.cfg.variance \
            else F.mse_loss(mean, z_final)
        logits = self._embed_z(z_final) @ self._embed_lang(lang).T / self.cfg.temperature  # [B, B]
        positive = (instruction_ids[:, None] == instruction_ids[None, :]).float()
        nce = -(torch.log_softmax(logits, dim=1) * positive / positive.sum(1, keepdim=True)).sum(1).mean()
        later = F.softplus(self.score(z_now, lang) - self.score(z_final, lang)).mean()
        critic = nce + later
        return {"loss": goal + critic + out.get("value", 0.0), "goal": goal, "critic_nce": nce,
                "critic_order": later, **out}

    def _value_loss(self, lang, z_now, to_go, success) -> dict[str, torch.Tensor]:
        target = self.cfg.discount ** to_go.float()
        if success is not None:
            target = torch.where(success, target, torch.zeros_like(target))
        return {"value": F.binary_cross_entropy_with_logits(self.value_logit(z_now, lang), target)}


def gaussian_nll(z: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """-log N(z; mean, diag σ²) up to its constant, summed over the last dimension: [..., D] -> [...]."""
    return 0.5 * ((z - mean) ** 2 * torch.exp(-log_var) + log_var).sum(-1)
