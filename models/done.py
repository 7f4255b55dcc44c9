"""Is the instruction fulfilled in this frame? A classifier on the world model's latent.

    DoneModel.done(z, ℓ) -> the probability that the frame of z fulfils the one-step instruction ℓ

The planner asks it which clause of a multi-step instruction is due (planner/subgoals.py). Its
labels come from the privileged state of every frame of every episode, for instructions the scene
admits ("push the red cube into the left side" holds wherever the red cube is in the left side, in
any episode, whatever that episode's own task; experiments/targets.py, relabel_subgoals). So the
label depends on the frame alone and varies within an episode and across the instructions of one
scene. The goal model's critic and value learn from episode outcomes and memorise the 4,000
training scenes (README); here there is nothing to memorise but the answer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .world_model import LANG_DIM


@dataclass
class DoneModelConfig:
    latent_dim: int = 128  # D, the world model's
    width: int = 512
    dropout: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)


class DoneModel(nn.Module):
    def __init__(self, cfg: DoneModelConfig):
        super().__init__()
        self.cfg = cfg
        self.net = nn.Sequential(nn.Linear(LANG_DIM + cfg.latent_dim, cfg.width), nn.SiLU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(cfg.width, cfg.width), nn.SiLU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(cfg.width, 1))

    @classmethod
    def load(cls, directory) -> "DoneModel":
        """The done model `foresight-train target=done` saved in `directory`, in eval mode."""
        from .checkpoint import load_model
        return load_model(directory, "done", lambda c: cls(DoneModelConfig(**c)))

    def logit(self, z: torch.Tensor, lang: torch.Tensor) -> torch.Tensor:
        """z [B, D], lang [B, L] (or [1, L]) -> [B]: the logit of "the frame of z fulfils ℓ"."""
        return self.net(torch.cat([lang.expand(len(z), -1), z], dim=-1))[:, 0]

    def done(self, z: torch.Tensor, lang: torch.Tensor) -> torch.Tensor:
        """z [B, D], lang [B, L] (or [1, L]) -> [B] in (0, 1)."""
        return torch.sigmoid(self.logit(z, lang))

    def forward(self, z: torch.Tensor, lang: torch.Tensor, label: torch.Tensor,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The training loss on relabelled frames: z [B, D], lang [B, L], label [B] (1: ℓ holds there)."""
        loss = F.binary_cross_entropy_with_logits(self.logit(z, lang), label.float())
        return {"loss": loss}
