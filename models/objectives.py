"""The world model's training objective (DESIGN.md, "The learning objectives").

    L = multistep · mean_k ‖ĝ_k − sg[f̄(o_{t+kK})]‖²       open-loop rollout over H chunks
      + onestep   · mean_k ‖g(z_{≤t+(k-1)K}, a_k, ℓ) − sg[f̄(o_{t+kK})]‖²   teacher forcing
      + λ · R(Z)

R is SIGReg on the online latents (no target network: f̄ = f with a stop-gradient), or, with an
EMA target encoder f̄, VICReg's variance/covariance terms; `none` exists to show collapse.
Future frames enter only as targets: the predictor's inputs are latents of frames up to t (and,
for teacher forcing, earlier targets' online latents, never the frame it predicts).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .regularizers import effective_rank, latent_std, sigreg, variance_covariance
from .world_model import WorldModel

REGULARIZERS = ("sigreg", "ema", "none")


@dataclass
class WorldModelLossConfig:
    regularizer: str = "sigreg"  # sigreg | ema | none
    weight: float = 0.1  # λ
    projections: int = 256  # SIGReg's random directions, fresh each step
    ema_decay: float = 0.99
    covariance_weight: float = 0.04  # of the covariance term relative to the variance term (ema)
    multistep: float = 1.0
    onestep: float = 1.0

    def __post_init__(self):
        if self.regularizer not in REGULARIZERS:
            raise ValueError(f"unknown regularizer {self.regularizer!r}; choose one of {', '.join(REGULARIZERS)}")

    def to_dict(self) -> dict:
        return asdict(self)


class WorldModelObjective(nn.Module):
    """Wraps the world model to compute its losses (one module, so DDP can wrap it)."""

    def __init__(self, model: WorldModel, cfg: WorldModelLossConfig):
        super().__init__()
        if (cfg.regularizer == "ema") != model.cfg.ema_target:
            raise ValueError("the ema regularizer needs a world model built with ema_target=True, and only it does")
        self.model, self.cfg = model, cfg

    def after_step(self) -> None:
        self.model.update_target(self.cfg.ema_decay)

    def forward(self, pixels, state, actions, future_pixels, future_state, lang,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """pixels uint8 [B, h, V, H, W, 3], state [B, h, P] (frames t-(h-1)K .. t); actions [B, H, K, A];
        future_pixels [B, H, ...], future_state [B, H, P] (frames after each chunk); lang [B, L].
        Returns every loss term, `loss` (their weighted sum) and latent diagnostics (detached)."""
        cfg, h = self.cfg, pixels.shape[1]
        frames = torch.cat([pixels, future_pixels], 1)
        states = torch.cat([state, future_state], 1)
        z = self.model.encode(frames, states)  # [B, h + H, D], online
        target = z.detach()[:, h:] if not self.model.cfg.ema_target else self.model.encode_target(frames, states)[:, h:]
        out = {}
        out["multistep"] = F.mse_loss(self.model.rollout(z[:, :h], actions, lang), target)
        # Teacher forcing: every chunk k predicted from the h online latents just before it.
        n_chunks = actions.shape[1]
        hist = z[:, :-1].unfold(1, h, 1).permute(0, 1, 3, 2)  # [B, H, h, D]
        lang_cond = self.model.predictor.language_condition(lang).repeat_interleave(n_chunks, 0)
        one = self.model.predictor.step(hist.flatten(0, 1), actions.flatten(0, 1), lang_cond)
        out["onestep"] = F.mse_loss(one, target.flatten(0, 1))
        flat = z.flatten(0, 1)
        if cfg.regularizer == "sigreg":
            out["sigreg"] = sigreg(flat, cfg.projections, generator)
            reg = out["sigreg"]
        elif cfg.regularizer == "ema":
            out["variance"], out["covariance"] = variance_covariance(flat)
            reg = out["variance"] + cfg.covariance_weight * out["covariance"]
        else:
            reg = flat.new_zeros(())
        out["loss"] = cfg.multistep * out["multistep"] + cfg.onestep * out["onestep"] + cfg.weight * reg
        out["latent_std"] = torch.tensor(latent_std(flat))
        out["effective_rank"] = torch.tensor(effective_rank(flat))
        return out
