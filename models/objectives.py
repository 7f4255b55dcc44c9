"""The world model's training objective (DESIGN.md, "The learning objectives").

    L = multistep · mean_k ‖ĝ_k − sg[f̄(o_{t+kK})]‖²       open-loop rollout over H chunks
      + onestep   · mean_k ‖g(z_{≤t+(k-1)K}, a_k, ℓ) − sg[f̄(o_{t+kK})]‖²   teacher forcing
      + λ · R(Z)
      + inverse  · mean_k ‖I(z_{t+(k-1)K}, z_{t+kK}) − a_k‖²   inverse dynamics (a training-only head I)
      + contrast · mean_k CE(softmax_j(−‖ĝ_k − z_j‖² / τ), j = t+kK)   over the window's frames j
      + reconstruct · ‖D(z_{t-(h-1)K}) − o_{t-(h-1)K}‖²   pixels of each window's first frame (a training-only decoder D)
      + pads · ‖P z_{t-(h-1)K} − pads‖²   the target pads' positions, read linearly (privileged, training only)

Why inverse and contrast: the tabletop's scenes differ far more from one another (colours,
objects, pads) than a scene changes within an episode, so prediction plus SIGReg alone is satisfied
by a latent of the static scene that ignores the pusher (a linear probe found no pusher position in it) and that
copying the last latent predicts as well as the model. Inverse dynamics makes the latent see what
the actions move; the temporal contrast makes each imagined latent tell its own future frame from
the window's others, so what changes must be encoded, and predicted. Both use only the episode's
own frames and actions: no privileged state.

The last two terms answer the opposite gap, and are off by default. What never changes within an
episode (where the target pads lie) gives prediction and contrast no reason to be kept, and a probe
found it barely in the latent, so no goal computed from the latent could tell where an object should
end. Rebuilding one frame per window from its latent asks for the whole static scene, label-free,
at a small decoder's cost. The pad term asks for just the pads, from privileged truth at training
time (as the VLA's "where" auxiliary does): the latent must hold each pad colour's position
linearly. Nothing reads the truth after training. Neither made the planner better (README).

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

from .decoder import PixelDecoder, PixelDecoderConfig
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
    inverse: float = 0.0  # weight of the inverse-dynamics term: (z_t, z_{t+K}) must tell the chunk
    # Weight of the temporal-contrast term: each imagined latent must be nearer its own frame's latent
    # than the other frames of its window (InfoNCE on the per-dimension squared distance / temperature).
    contrast: float = 0.0
    contrast_temperature: float = 0.05
    # Weight of pixel reconstruction of each window's first frame (first camera) from its latent, by
    # a training-only decoder of `reconstruct_width` channels (models/decoder.py); 0: off.
    reconstruct: float = 0.0
    reconstruct_width: int = 64
    # Weight of the pad term: a training-only linear head reads the xy of every pad colour present
    # from each window's first latent (MSE in metres; absent colours are left out); 0: off.
    pads: float = 0.0
    pad_colours: int = 0  # how many colours a pad can have (the target sets it from the data)

    def __post_init__(self):
        if self.regularizer not in REGULARIZERS:
            raise ValueError(f"unknown regularizer {self.regularizer!r}; choose one of {', '.join(REGULARIZERS)}")

    def to_dict(self) -> dict:
        return asdict(self)


def prediction_losses(model: WorldModel, z: torch.Tensor, target: torch.Tensor, actions: torch.Tensor,
                      lang: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The predictor's two losses over a window: z [B, h + H, D] (h history latents, then one per
    chunk), target [B, H, D], actions [B, H, K, A], lang [B, L] -> (the open-loop rollout [B, H, D],
    its mean squared error, the teacher-forced one-step error)."""
    h = z.shape[1] - actions.shape[1]
    pred = model.rollout(z[:, :h], actions, lang)
    # Teacher forcing: every chunk k predicted from the h latents just before it.
    hist = z[:, :-1].unfold(1, h, 1).permute(0, 1, 3, 2)  # [B, H, h, D]
    lang_cond = model.predictor.language_condition(lang).repeat_interleave(actions.shape[1], 0)
    one = model.predictor.step(hist.flatten(0, 1), actions.flatten(0, 1), lang_cond)
    return pred, F.mse_loss(pred, target), F.mse_loss(one, target.flatten(0, 1))


class PredictorObjective(nn.Module):
    """The predictor alone, on latents a frozen encoder made: multi-step plus one-step error. For
    fine-tuning a trained world model to roll out further than its recipe's horizon.

    With a done model (frozen, models/done.py), a third term asks that it read each imagined latent
    as it reads the real one, for each clause of the window's instruction:

        done · mean_{k,c} BCE(logit(ẑ_k, c), y_k,c),   y = σ(logit(z_k, c)) or the clause's truth

    The latent error weighs all D entries alike, and most of them (the scene, the pusher) say little
    about whether an instruction holds; this term weighs what decides it, which is what offline
    scoring reads off an end state imagined 10 to 20 chunks ahead. It is value equivalence, as
    MuZero and TD-MPC train their latent dynamics through reward and value heads. The labels are the
    done model's own readings of real frames, or (as TD-MPC's rewards) the truth of each frame, which
    the done model itself was trained on; never an episode's outcome.
    """

    def __init__(self, model: WorldModel, done_model: nn.Module | None = None, done_weight: float = 0.0):
        super().__init__()
        if done_weight > 0 and done_model is None:
            raise ValueError("the done term needs a done model; set target.done to its checkpoint, or done_weight=0")
        self.model, self.done_weight = model, done_weight
        model.encoder.requires_grad_(False)
        self.done_model = done_model.requires_grad_(False).eval() if done_model is not None else None

    def train(self, mode: bool = True) -> "PredictorObjective":
        super().train(mode)
        if self.done_model is not None:
            self.done_model.eval()  # a frozen reader: its dropout stays off
        return self

    def forward(self, z: torch.Tensor, actions: torch.Tensor, lang: torch.Tensor, clauses: torch.Tensor | None = None,
                clause_mask: torch.Tensor | None = None, clause_truth: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """z [B, h + H, D] (history, then the latent after each chunk), actions [B, H, K, A], lang [B, L];
        for the done term, the instruction's clauses [B, C, L], which of them exist [B, C] and, to
        learn from the truth instead of the done model's reading of real latents, whether each holds
        after each chunk [B, H, C]."""
        h = z.shape[1] - actions.shape[1]
        pred, multistep, onestep = prediction_losses(self.model, z, z[:, h:], actions, lang)
        out = {"multistep": multistep.detach(), "onestep": onestep.detach()}
        loss = multistep + onestep
        if self.done_weight > 0:
            if clauses is None or clause_mask is None:
                raise ValueError("the done term needs each window's clauses [B, C, L] and clause_mask [B, C]")
            if clause_truth is None:
                with torch.no_grad():
                    real = torch.sigmoid(self.clause_logits(z[:, h:], clauses))
            else:
                real = clause_truth
            bce = F.binary_cross_entropy_with_logits(self.clause_logits(pred, clauses), real, reduction="none")
            done = (bce * clause_mask[:, None]).sum() / (clause_mask.sum() * pred.shape[1]).clamp(min=1)
            loss, out["done"] = loss + self.done_weight * done, done.detach()
        return {"loss": loss, **out}

    def clause_logits(self, z: torch.Tensor, clauses: torch.Tensor) -> torch.Tensor:
        """The done model's logit for every latent z [B, H, D] and clause [B, C, L] -> [B, H, C]."""
        (b, n, d), c = z.shape, clauses.shape[1]
        zz = z[:, :, None].expand(b, n, c, d).flatten(0, 2)
        return self.done_model.logit(zz, clauses[:, None].expand(b, n, c, -1).flatten(0, 2)).view(b, n, c)


class WorldModelObjective(nn.Module):
    """Wraps the world model to compute its losses (one module, so DDP can wrap it)."""

    def __init__(self, model: WorldModel, cfg: WorldModelLossConfig):
        super().__init__()
        if (cfg.regularizer == "ema") != model.cfg.ema_target:
            raise ValueError("the ema regularizer needs a world model built with ema_target=True, and only it does")
        self.model, self.cfg = model, cfg
        c = model.cfg
        self.inverse_head = (nn.Sequential(nn.Linear(2 * c.latent_dim, 256), nn.SiLU(), nn.Linear(256, c.chunk * c.action_dim))
                             if cfg.inverse > 0 else None)
        self.reconstruct_head = (PixelDecoder(PixelDecoderConfig(c.latent_dim, c.image_size, cfg.reconstruct_width))
                                 if cfg.reconstruct > 0 else None)
        if cfg.pads > 0 and cfg.pad_colours < 1:
            raise ValueError("the pad term needs pad_colours ≥ 1 (the number of pad colours in the data)")
        self.pad_head = nn.Linear(c.latent_dim, 2 * cfg.pad_colours) if cfg.pads > 0 else None

    def training_heads(self) -> dict[str, nn.Module]:
        """The heads only the losses use: trained and resumed with the model, never shipped."""
        return {name: head for name, head in (("inverse_head", self.inverse_head),
                                              ("reconstruct_head", self.reconstruct_head),
                                              ("pad_head", self.pad_head)) if head is not None}

    def after_step(self) -> None:
        self.model.update_target(self.cfg.ema_decay)

    def forward(self, pixels, state, actions, future_pixels, future_state, lang, pads=None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """pixels uint8 [B, h, V, H, W, 3], state [B, h, P] (frames t-(h-1)K .. t); actions [B, H, K, A];
        future_pixels [B, H, ...], future_state [B, H, P] (frames after each chunk); lang [B, L];
        pads [B, pad_colours, 2] (xy of each pad colour, NaN where absent; for the pad term only).
        Returns every loss term, `loss` (their weighted sum) and latent diagnostics (detached)."""
        cfg, h = self.cfg, pixels.shape[1]
        frames = torch.cat([pixels, future_pixels], 1)
        states = torch.cat([state, future_state], 1)
        z = self.model.encode(frames, states)  # [B, h + H, D], online
        target = z.detach()[:, h:] if not self.model.cfg.ema_target else self.model.encode_target(frames, states)[:, h:]
        out = {}
        pred, out["multistep"], out["onestep"] = prediction_losses(self.model, z, target, actions, lang)
        if self.inverse_head is not None:
            pairs = torch.cat([z[:, h - 1:-1], z[:, h:]], dim=-1)  # consecutive latents around each chunk
            out["inverse"] = F.mse_loss(self.inverse_head(pairs), actions.flatten(2))
        if cfg.contrast > 0:
            d = ((pred[:, :, None] - z[:, None]) ** 2).mean(-1)  # [B, H, h + H]: imagined vs every frame
            labels = torch.arange(h, h + pred.shape[1], device=d.device).expand(len(d), -1)
            out["contrast"] = F.cross_entropy((-d / cfg.contrast_temperature).flatten(0, 1), labels.flatten())
        if self.reconstruct_head is not None:
            first = pixels[:, 0, 0].float() / 255  # [B, H, W, 3]: the first camera, oldest history frame
            out["reconstruct"] = F.mse_loss(self.reconstruct_head.images(z[:, 0]), first)
        if self.pad_head is not None:
            if pads is None or pads.shape != (len(z), cfg.pad_colours, 2):
                raise ValueError(f"the pad term needs pads [B, {cfg.pad_colours}, 2], got "
                                 f"{None if pads is None else list(pads.shape)}")
            present = torch.isfinite(pads)  # a batch may hold no pad task at all: the term is then 0
            err = (self.pad_head(z[:, 0]).view_as(pads) - pads.nan_to_num()) ** 2
            out["pads"] = err[present].sum() / present.sum().clamp(min=1)
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
        if self.inverse_head is not None:
            out["loss"] = out["loss"] + cfg.inverse * out["inverse"]
        if cfg.contrast > 0:
            out["loss"] = out["loss"] + cfg.contrast * out["contrast"]
        if self.reconstruct_head is not None:
            out["loss"] = out["loss"] + cfg.reconstruct * out["reconstruct"]
        if self.pad_head is not None:
            out["loss"] = out["loss"] + cfg.pads * out["pads"]
        out["latent_std"] = torch.tensor(latent_std(flat))
        out["effective_rank"] = torch.tensor(effective_rank(flat))
        return out
