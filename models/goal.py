"""Where the instruction wants the world to end up, in the world model's latent space.

    GoalModel.goal(ℓ, z_now)  -> z_goal       regressed onto sg[f̄(o_T)] of successful episodes
    GoalModel.score(z, ℓ)     -> how well z fulfils ℓ (higher is better), trained contrastively

The goal is a residual on z_now: most of the scene (objects the instruction does not name) ends
where it started, so the network only has to say what moves.
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

    def to_dict(self) -> dict:
        return asdict(self)


def _mlp(inp: int, width: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, out))


class GoalModel(nn.Module):
    def __init__(self, cfg: GoalModelConfig):
        super().__init__()
        self.cfg = cfg
        self.goal_net = _mlp(LANG_DIM + cfg.latent_dim, cfg.width, cfg.latent_dim)
        self.critic_z = _mlp(cfg.latent_dim, cfg.width, cfg.critic_dim)
        self.critic_lang = _mlp(LANG_DIM, cfg.width, cfg.critic_dim)

    @classmethod
    def load(cls, directory) -> "GoalModel":
        """The goal model `foresight-train target=goal` saved in `directory`, in eval mode."""
        from .checkpoint import load_model
        return load_model(directory, "goal", lambda c: cls(GoalModelConfig(**c)))

    def goal(self, lang: torch.Tensor, z_now: torch.Tensor) -> torch.Tensor:
        """lang [B, L], z_now [B, D] -> z_goal [B, D]."""
        return z_now + self.goal_net(torch.cat([lang, z_now], dim=-1))

    def score(self, z: torch.Tensor, lang: torch.Tensor) -> torch.Tensor:
        """z [B, D], lang [B, L] (or [1, L]) -> [B]: cosine similarity / temperature."""
        return (self._embed_z(z) * self._embed_lang(lang)).sum(-1) / self.cfg.temperature

    def _embed_z(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.critic_z(z), dim=-1)

    def _embed_lang(self, lang: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.critic_lang(lang), dim=-1)

    def forward(self, lang: torch.Tensor, instruction_ids: torch.Tensor, z_now: torch.Tensor,
                z_final: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The training losses (use `goal` and `score` for inference) on a batch of successful episodes (latents from the frozen target encoder).

        lang [B, L]; instruction_ids [B] (equal ids = the same instruction text, so that duplicates
        in a batch are positives, not negatives); z_now [B, D] a frame of the episode; z_final [B, D]
        its last frame. Returns goal (MSE), critic (InfoNCE over the batch's instructions plus a
        ranking term: the final state must outscore the current one) and their sum, loss.
        """
        goal = F.mse_loss(self.goal(lang, z_now), z_final)
        logits = self._embed_z(z_final) @ self._embed_lang(lang).T / self.cfg.temperature  # [B, B]
        positive = (instruction_ids[:, None] == instruction_ids[None, :]).float()
        nce = -(torch.log_softmax(logits, dim=1) * positive / positive.sum(1, keepdim=True)).sum(1).mean()
        later = F.softplus(self.score(z_now, lang) - self.score(z_final, lang)).mean()
        critic = nce + later
        return {"loss": goal + critic, "goal": goal, "critic_nce": nce, "critic_order": later}
