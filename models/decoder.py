"""A small pixel decoder of the world model's frozen target latents, for viewing only.

    PixelDecoder.decode(z [B, D]) -> uint8 [B, H, W, 3]     the first camera's image

It is trained after the world model (`foresight-train target=decoder`) by pixel MSE, so that
videos can show what the predictor imagines. The planner never uses it: a JEPA's latents are not
trained to keep every pixel, so decoded frames are blurry where the latent is vague.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class PixelDecoderConfig:
    latent_dim: int = 128  # D, the world model's
    image_size: int = 64  # the world model's; divisible by 16
    width: int = 128  # channels at 1/16 resolution, halved at each upsampling (at least 16)
    world_model: str = ""  # digest of the world model's weights the decoder was trained on (world_model_digest)

    def to_dict(self) -> dict:
        return asdict(self)


def world_model_digest(directory: str | Path) -> str:
    """A short fingerprint of a world-model checkpoint's weights: a decoder only fits the one it
    was trained on, even when another has the same latent width."""
    return hashlib.sha256((Path(directory) / "model.safetensors").read_bytes()).hexdigest()[:16]


class PixelDecoder(nn.Module):
    """z [B, D] -> a linear map to a (H/16)² grid, then 4 transposed convolutions (x2 each)."""

    def __init__(self, cfg: PixelDecoderConfig):
        super().__init__()
        if cfg.image_size % 16:
            raise ValueError(f"the pixel decoder needs an image size divisible by 16, got {cfg.image_size}")
        self.cfg = cfg
        chans = [max(16, cfg.width >> i) for i in range(4)]
        self.base = cfg.image_size // 16
        self.inp = nn.Linear(cfg.latent_dim, chans[0] * self.base ** 2)
        self.up = nn.Sequential(*[layer for i in range(3) for layer in (
            nn.ConvTranspose2d(chans[i], chans[i + 1], 4, stride=2, padding=1), nn.GroupNorm(8, chans[i + 1]),
            nn.SiLU())])
        # The last upsampling gives RGB directly: a full-resolution 3x3 conv after it costs 3x the rest.
        self.out = nn.ConvTranspose2d(chans[3], 3, 4, stride=2, padding=1)

    @classmethod
    def load(cls, directory) -> "PixelDecoder":
        """The decoder `foresight-train target=decoder` saved in `directory`, in eval mode."""
        from .checkpoint import load_model
        return load_model(directory, "decoder", lambda c: cls(PixelDecoderConfig(**c)))

    def images(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, D] -> RGB in [0, 1], [B, H, W, 3]."""
        if z.ndim != 2 or z.shape[1] != self.cfg.latent_dim:
            raise ValueError(f"the decoder takes latents [B, {self.cfg.latent_dim}] (the width of the world model "
                             f"it was trained on), got {list(z.shape)}; train a decoder for this world model "
                             "with foresight-train target=decoder world_model=<its directory>")
        x = self.inp(z).view(len(z), -1, self.base, self.base)
        return torch.sigmoid(self.out(self.up(x))).permute(0, 2, 3, 1)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, D] -> uint8 [B, H, W, 3], for videos."""
        return (self.images(z) * 255).round().to(torch.uint8)

    def forward(self, z: torch.Tensor, pixels: torch.Tensor,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Training loss: z [B, D] (frozen target latents), pixels uint8 [B, H, W, 3] the frames they
        encode. Returns loss (pixel MSE on [0, 1]) and psnr."""
        mse = F.mse_loss(self.images(z), pixels.float() / 255)
        return {"loss": mse, "psnr": -10 * torch.log10(mse.detach())}
