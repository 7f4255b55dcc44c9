"""The JEPA world model: an encoder f_θ of observations, and a predictor g_φ that imagines the
latent after each action chunk, conditioned on the instruction.

    z_t      = f_θ(pixels_t, state_t)                         [B, D]
    ẑ_{k+1}  = g_φ(ẑ_{k-h+1..k}, a_k, ℓ)   for k = 0..H-1     [B, D]

The predictor is built for the planner's budget (thousands of candidates per replan on two CPU
cores), so it is a stack of residual MLP blocks, not a transformer. Conditioning is AdaLN-zero:
each block's shift, scale and gate come from the instruction (computed once per rollout and
shared by every candidate) plus a small per-candidate action embedding, and start at zero so
an untrained block is the identity. The output is a residual on the latest latent.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

LANG_DIM = 384  # all-MiniLM-L6-v2


@dataclass
class WorldModelConfig:
    image_size: int = 64
    cameras: int = 1
    state_dim: int = 4
    action_dim: int = 2
    chunk: int = 8  # K: actions per chunk
    history: int = 2  # h: latents the predictor sees
    latent_dim: int = 128  # D
    encoder: str = "cnn"  # "cnn" or "vit"
    width: int = 256  # predictor width
    blocks: int = 2
    cond_dim: int = 64
    use_language: bool = True  # off for the ablation

    def to_dict(self) -> dict:
        return asdict(self)


class CNNEncoder(nn.Module):
    """64x64 RGB (per camera) and the state vector -> a latent of width D."""

    def __init__(self, cfg: WorldModelConfig):
        super().__init__()
        chans = (3 * cfg.cameras, 32, 64, 128, 128)
        layers = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.GroupNorm(8, cout), nn.GELU()]
        self.conv = nn.Sequential(*layers)
        side = cfg.image_size // 16
        self.proj = nn.Sequential(nn.Linear(128 * side * side + cfg.state_dim, 512), nn.GELU(),
                                  nn.Linear(512, cfg.latent_dim))

    def forward(self, pixels: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """pixels uint8 [N, V, H, W, 3], state [N, P] -> [N, D]."""
        n, v, h, w, _ = pixels.shape
        x = pixels.permute(0, 1, 4, 2, 3).reshape(n, v * 3, h, w).float() / 127.5 - 1.0
        return self.proj(torch.cat([self.conv(x).flatten(1), state], dim=1))


class ViTEncoder(nn.Module):
    """A ViT-tiny option: 8x8 patches, 4 layers of width 192, mean-pooled, plus the state."""

    def __init__(self, cfg: WorldModelConfig, width: int = 192, depth: int = 4, patch: int = 8):
        super().__init__()
        self.patch = nn.Conv2d(3 * cfg.cameras, width, patch, stride=patch)
        n_tokens = (cfg.image_size // patch) ** 2
        self.pos = nn.Parameter(torch.randn(1, n_tokens, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, 3, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)  # pre-norm layers cannot use it
        self.proj = nn.Sequential(nn.LayerNorm(width + cfg.state_dim), nn.Linear(width + cfg.state_dim, 512),
                                  nn.GELU(), nn.Linear(512, cfg.latent_dim))

    def forward(self, pixels: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        n, v, h, w, _ = pixels.shape
        x = pixels.permute(0, 1, 4, 2, 3).reshape(n, v * 3, h, w).float() / 127.5 - 1.0
        tokens = self.blocks(self.patch(x).flatten(2).transpose(1, 2) + self.pos)
        return self.proj(torch.cat([tokens.mean(1), state], dim=1))


class AdaLNBlock(nn.Module):
    """x + gate(c) * MLP(LN(x) * (1 + scale(c)) + shift(c)), with the modulation zero-initialised."""

    def __init__(self, width: int, cond_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.modulation = nn.Linear(cond_dim, 3 * width)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(cond).chunk(3, dim=-1)
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


class Predictor(nn.Module):
    """g_φ: (history of latents, one action chunk, instruction) -> the next latent."""

    def __init__(self, cfg: WorldModelConfig):
        super().__init__()
        self.cfg = cfg
        self.inp = nn.Linear(cfg.history * cfg.latent_dim, cfg.width)
        self.action = nn.Sequential(nn.Linear(cfg.chunk * cfg.action_dim, cfg.cond_dim), nn.SiLU(),
                                    nn.Linear(cfg.cond_dim, cfg.cond_dim))
        self.language = nn.Sequential(nn.Linear(LANG_DIM, cfg.cond_dim), nn.SiLU(),
                                      nn.Linear(cfg.cond_dim, cfg.cond_dim))
        self.blocks = nn.ModuleList(AdaLNBlock(cfg.width, cfg.cond_dim) for _ in range(cfg.blocks))
        self.out = nn.Sequential(nn.LayerNorm(cfg.width), nn.Linear(cfg.width, cfg.latent_dim))

    def language_condition(self, lang: torch.Tensor) -> torch.Tensor:
        """[B, L] -> [B, C]; zeros when language conditioning is off (the ablation)."""
        if not self.cfg.use_language:
            return torch.zeros(lang.shape[0], self.cfg.cond_dim, dtype=lang.dtype, device=lang.device)
        return self.language(lang)

    def step(self, history: torch.Tensor, chunk: torch.Tensor, lang_cond: torch.Tensor) -> torch.Tensor:
        """history [B, h, D], chunk [B, K, A], lang_cond [B, C] (or [1, C]) -> next latent [B, D]."""
        cond = F.silu(self.action(chunk.flatten(1)) + lang_cond)
        x = self.inp(history.flatten(1))
        for block in self.blocks:
            x = block(x, cond)
        return history[:, -1] + self.out(x)


class WorldModel(nn.Module):
    """Encoder + predictor, with the two calls the planner and training use."""

    def __init__(self, cfg: WorldModelConfig):
        super().__init__()
        if cfg.encoder not in ("cnn", "vit"):
            raise ValueError(f"unknown encoder {cfg.encoder!r}; choose cnn or vit")
        self.cfg = cfg
        self.encoder = CNNEncoder(cfg) if cfg.encoder == "cnn" else ViTEncoder(cfg)
        self.predictor = Predictor(cfg)

    def encode(self, pixels: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """pixels uint8 [B, T, V, H, W, 3], state [B, T, P] -> latents [B, T, D]."""
        b, t = pixels.shape[:2]
        z = self.encoder(pixels.flatten(0, 1), state.flatten(0, 1))
        return z.view(b, t, -1)

    def rollout(self, z_hist: torch.Tensor, chunks: torch.Tensor, lang: torch.Tensor) -> torch.Tensor:
        """Imagine H chunks ahead, autoregressively.

        z_hist [B, h, D] (the latest h latents), chunks [B, H, K, A], lang [B, L] or [1, L] (one
        instruction for every candidate: its conditioning is then computed once) -> [B, H, D].
        """
        h = self.cfg.history
        if z_hist.shape[1] < h:  # at an episode's start, repeat the first latent
            z_hist = torch.cat([z_hist[:, :1].expand(-1, h - z_hist.shape[1], -1), z_hist], dim=1)
        history = z_hist[:, -h:]
        lang_cond = self.predictor.language_condition(lang)
        out = []
        for k in range(chunks.shape[1]):
            z_next = self.predictor.step(history, chunks[:, k], lang_cond)
            out.append(z_next)
            history = torch.cat([history[:, 1:], z_next[:, None]], dim=1)
        return torch.stack(out, dim=1)
