"""The JEPA world model: an encoder f_θ of observations, and a predictor g_φ that imagines the
latent after each action chunk, conditioned on the instruction.

    z_t      = f_θ(pixels_t, state_t)                         [B, D]
    ẑ_{k+1}  = g_φ(ẑ_{k-h+1..k}, a_k, ℓ)   for k = 0..H-1     [B, D]

The predictor is built for the planner's budget (thousands of candidates per replan on two CPU
cores), so it is a stack of residual MLP blocks, not a transformer, and everything that does not
depend on the candidate (the instruction's conditioning) is computed once per rollout.
"""

from __future__ import annotations

import copy
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
    # The state is divided by this (the training data's std per entry) so it enters the encoder at
    # the scale of the image features; None leaves it as it is.
    state_scale: list[float] | None = None
    action_dim: int = 2
    chunk: int = 8  # K: actions per chunk
    history: int = 2  # h: latents the predictor sees
    latent_dim: int = 128  # D
    encoder: str = "cnn"  # "cnn" or "vit"
    keypoints: int = 32  # of the cnn encoder's spatial soft-argmax
    grid: int = 4  # side of the cnn encoder's last feature map at 64x64 input, flattened (4 or 8)
    # The cnn encoder's keypoints are the latent's first 2·keypoints entries (through a learned
    # per-entry scale and offset) instead of only feeding its projection, so where things are stays
    # linearly readable; the projection fills the rest. Their maps are then standardised and
    # sharpened by a learned temperature, so that every keypoint follows something from the start.
    keypoint_latent: bool = False
    # The predictor is sized for the planner's budget (foresight-bench world_model): about
    # 0.23 MFLOP per imagined chunk-step. Three blocks twice as wide (0.50 MFLOP) predicted about
    # as well (foresight-evaluate: 0.21 and 0.30 of copy-last's error at 1 and 4 chunks, against 0.23
    # and 0.33).
    width: int = 128
    blocks: int = 2
    mlp_ratio: int = 1
    cond_dim: int = 128
    use_language: bool = True  # off for the ablation
    ema_target: bool = False  # an EMA copy of the encoder gives the targets (else the encoder, stop-grad)

    def to_dict(self) -> dict:
        return asdict(self)


class CNNEncoder(nn.Module):
    """RGB (per camera, stacked as channels) and the state vector -> a latent of width D.

    A 4x4 stride-4 stem (patchify) and stride-2 convolutions down to a map of `grid` cells a side
    (64x64 -> 8x8x64 in the recipe, or 4x4x128), flattened: the finer grid says more precisely
    where things are, and costs less. Beside it, a spatial soft-argmax on the stem's features:
    each of `keypoints` maps becomes the expected (x, y) of its activation, a form of "where things
    are" that the predictor can read directly and, with `keypoint_latent`, that is part of the
    latent itself. (Keypoints alone let the latent collapse onto the state vector, to an effective
    rank of 3; a full-resolution stride-2 stem costs 5x more.)
    """

    def __init__(self, cfg: WorldModelConfig):
        super().__init__()
        if cfg.image_size % 16:
            raise ValueError(f"the cnn encoder needs an image size divisible by 16, got {cfg.image_size}")
        if cfg.grid not in (4, 8):
            raise ValueError(f"the cnn encoder's grid must be 4 or 8, got {cfg.grid}")
        self.stem = nn.Sequential(nn.Conv2d(3 * cfg.cameras, 32, 4, stride=4), nn.GroupNorm(8, 32), nn.SiLU())
        layers = [nn.Conv2d(32, 64, 4, stride=2, padding=1), nn.GroupNorm(8, 64), nn.SiLU()]
        if cfg.grid == 4:
            layers += [nn.Conv2d(64, 128, 4, stride=2, padding=1), nn.GroupNorm(8, 128), nn.SiLU()]
        self.conv = nn.Sequential(*layers)
        self.keypoint_maps = nn.Conv2d(32, cfg.keypoints, 1)
        side = torch.linspace(-1.0, 1.0, cfg.image_size // 4)
        ys, xs = torch.meshgrid(side, side, indexing="ij")
        self.register_buffer("grid", torch.stack([xs.flatten(), ys.flatten()], dim=1), persistent=False)
        flat = (128 if cfg.grid == 4 else 64) * (cfg.image_size * cfg.grid // 64) ** 2
        self.keypoint_latent = cfg.keypoint_latent
        n_points = 2 * cfg.keypoints if cfg.keypoint_latent else 0
        if cfg.latent_dim <= n_points:
            raise ValueError(f"keypoint_latent puts the {cfg.keypoints} keypoints' {n_points} coordinates in the "
                             f"latent, so latent_dim must exceed {n_points}, got {cfg.latent_dim}")
        if cfg.keypoint_latent:
            # Initialised to spread coordinates in [-1, 1] to about unit variance, as SIGReg asks.
            self.point_scale = nn.Parameter(torch.full((n_points,), 2.0))
            self.point_shift = nn.Parameter(torch.zeros(n_points))
            # Raw 1x1 maps start almost flat: their soft-argmax sits at the centre and barely
            # learns (24 of 32 keypoints stayed there in a trained model).
            self.point_temperature = nn.Parameter(torch.full((cfg.keypoints, 1), 3.0))
        self.proj = nn.Sequential(nn.Linear(flat + 2 * cfg.keypoints + cfg.state_dim, 512), nn.SiLU(),
                                  nn.Linear(512, cfg.latent_dim - n_points))

    def forward(self, pixels: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """pixels uint8 [N, V, H, W, 3], state [N, P] -> [N, D]."""
        n, v, h, w, _ = pixels.shape
        x = self.stem(pixels.permute(0, 1, 4, 2, 3).reshape(n, v * 3, h, w).float() / 127.5 - 1.0)
        logits = self.keypoint_maps(x).flatten(2)  # [N, keypoints, h/4 * w/4]
        if self.keypoint_latent:  # standardised per map (layer_norm: one fused pass, not mean, std and divide)
            logits = F.layer_norm(logits, logits.shape[-1:], eps=1e-6) * self.point_temperature
        attention = torch.softmax(logits, dim=-1)
        keypoints = (attention @ self.grid).flatten(1)  # [N, 2 * keypoints]
        rest = self.proj(torch.cat([self.conv(x).flatten(1), keypoints, state], dim=1))
        if not self.keypoint_latent:
            return rest
        return torch.cat([keypoints * self.point_scale + self.point_shift, rest], dim=1)


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
    """x + gate * MLP(LN(x) * (1 + scale) + shift); shift, scale and gate come from the condition."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        h = F.layer_norm(x, x.shape[-1:]) * (1 + scale) + shift
        return x + gate * self.fc2(F.silu(self.fc1(h)))


class Predictor(nn.Module):
    """g_φ: (history of latents, one action chunk, instruction) -> the next latent.

    The action chunk enters with the history through the input layer (it differs per candidate);
    the instruction modulates every block by AdaLN-zero (it is the same for every candidate, so its
    shift/scale/gate are computed once per rollout and broadcast). The modulation starts at zero,
    so an untrained block is the identity. The output is a residual on the latest latent.
    """

    def __init__(self, cfg: WorldModelConfig):
        super().__init__()
        self.cfg = cfg
        self.inp = nn.Linear(cfg.history * cfg.latent_dim + cfg.chunk * cfg.action_dim, cfg.width)
        self.language = nn.Sequential(nn.Linear(LANG_DIM, cfg.cond_dim), nn.SiLU())
        self.modulation = nn.Linear(cfg.cond_dim, 3 * cfg.width * (cfg.blocks + 1))
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)
        self.blocks = nn.ModuleList(AdaLNBlock(cfg.width, cfg.mlp_ratio * cfg.width) for _ in range(cfg.blocks))
        self.out = nn.Linear(cfg.width, cfg.latent_dim)

    def language_condition(self, lang: torch.Tensor) -> torch.Tensor:
        """[B, L] -> the modulation of every block [B, blocks + 1, 3, W]; without language (the
        ablation) a learned constant, the same for every instruction."""
        cond = self.language(lang) if self.cfg.use_language else self.language(torch.zeros_like(lang))
        return self.modulation(cond).view(len(lang), self.cfg.blocks + 1, 3, self.cfg.width)

    def step(self, history: torch.Tensor, chunk: torch.Tensor, lang_cond: torch.Tensor) -> torch.Tensor:
        """history [B, h, D], chunk [B, K, A], lang_cond [B or 1, blocks + 1, 3, W] -> next latent [B, D]."""
        x = self.inp(torch.cat([history.flatten(1), chunk.flatten(1)], dim=1))
        for i, block in enumerate(self.blocks):
            x = block(x, *lang_cond[:, i].unbind(1))
        shift, scale, _ = lang_cond[:, -1].unbind(1)  # the head's modulation (its gate is unused)
        return history[:, -1] + self.out(F.layer_norm(x, x.shape[-1:]) * (1 + scale) + shift)

    def for_instruction(self, lang: torch.Tensor) -> "InstructionPredictor":
        """This predictor with one instruction [1, L] folded into its weights (what a planner
        wants: every candidate shares the instruction)."""
        return InstructionPredictor(self, lang)


class InstructionPredictor:
    """The predictor's rollout for one fixed instruction, with the instruction's AdaLN modulation
    folded into the linear layers once, so a step is only layer norms, matmuls and the activation:

        fc1(LN(x)·(1 + scale) + shift) = LN(x) @ (W1·(1 + scale))ᵀ + (b1 + W1 @ shift)
        gate · fc2(y)                  = y @ (gate·W2)ᵀ + gate·b2

    The same function as Predictor.step (to float rounding), with three fewer elementwise passes
    over the batch per block and no concatenation: 1,024 candidates × 4 chunks run about 1.2x
    faster (foresight-bench world_model).
    """

    def __init__(self, predictor: Predictor, lang: torch.Tensor):
        if lang.shape[0] != 1:
            raise ValueError(f"for_instruction folds one instruction, got a batch of {lang.shape[0]}")
        cond = predictor.language_condition(lang)[0]  # [blocks + 1, 3, W]
        self.inp = predictor.inp
        self.blocks = []
        for block, (shift, scale, gate) in zip(predictor.blocks, cond):
            w1, w2 = block.fc1.weight, block.fc2.weight
            self.blocks.append((w1 * (1 + scale), block.fc1.bias + w1 @ shift, w2 * gate[:, None], block.fc2.bias * gate))
        shift, scale, _ = cond[-1]
        self.out_weight = predictor.out.weight * (1 + scale)
        self.out_bias = predictor.out.bias + predictor.out.weight @ shift

    def rollout(self, history: torch.Tensor, chunks: torch.Tensor) -> torch.Tensor:
        """history [B, h, D], chunks [B, H, K, A] -> [B, H, D]: H steps, with the input layer split
        by what it reads, so nothing is concatenated: the chunks' part for all H at once, and each
        latent's part where it sits in the history."""
        h, d = history.shape[1:]
        w_latents, w_chunk = self.inp.weight.split([h * d, self.inp.in_features - h * d], dim=1)
        w_latents = [w.t().contiguous() for w in w_latents.split(d, dim=1)]  # [D, W] per history slot
        from_chunks = F.linear(chunks.flatten(2), w_chunk, self.inp.bias)  # [B, H, W]
        latents = list(history.unbind(1))
        for k in range(chunks.shape[1]):
            x = from_chunks[:, k]
            for z, w in zip(latents[-h:], w_latents):
                x = torch.addmm(x, z, w)
            latents.append(self._from_input(x, latents[-1]))
        return torch.stack(latents[h:], dim=1)

    def _from_input(self, x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """The input layer's output x [B, W] and the latest latent [B, D] -> next latent [B, D]."""
        # A product, then in-place adds: on CPU, addmm first copies the (broadcast) bias and is slower.
        for w1, b1, w2, b2 in self.blocks:
            hidden = F.silu((F.layer_norm(x, x.shape[-1:]) @ w1.t()).add_(b1), inplace=True)
            x = (hidden @ w2.t()).add_(b2).add_(x)
        return (F.layer_norm(x, x.shape[-1:]) @ self.out_weight.t()).add_(self.out_bias).add_(last)


class WorldModel(nn.Module):
    """Encoder + predictor, with the two calls the planner and training use."""

    def __init__(self, cfg: WorldModelConfig):
        super().__init__()
        if cfg.encoder not in ("cnn", "vit"):
            raise ValueError(f"unknown encoder {cfg.encoder!r}; choose cnn or vit")
        self.cfg = cfg
        self.encoder = CNNEncoder(cfg) if cfg.encoder == "cnn" else ViTEncoder(cfg)
        self.predictor = Predictor(cfg)
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False) if cfg.ema_target else None
        scale = torch.tensor(cfg.state_scale if cfg.state_scale else [1.0] * cfg.state_dim, dtype=torch.float32)
        if scale.shape != (cfg.state_dim,):
            raise ValueError(f"state_scale has {len(scale)} entries; the state has {cfg.state_dim}")
        self.register_buffer("state_scale", scale, persistent=False)  # saved in the config

    @classmethod
    def load(cls, directory) -> "WorldModel":
        """The world model `foresight-train target=world_model` saved in `directory`, in eval mode."""
        from .checkpoint import load_model
        return load_model(directory, "world_model", lambda c: cls(WorldModelConfig(**c)))

    def encode(self, pixels: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """pixels uint8 [B, T, V, H, W, 3], state [B, T, P] -> latents [B, T, D]."""
        b, t = pixels.shape[:2]
        z = self.encoder(pixels.flatten(0, 1), (state / self.state_scale).flatten(0, 1))
        return z.view(b, t, -1)

    @torch.no_grad()
    def encode_target(self, pixels: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """The latents the predictor is trained to reach, sg[f̄(o)]: [B, T, D]. Goals live here."""
        if self.target_encoder is None:
            return self.encode(pixels, state)
        b, t = pixels.shape[:2]
        return self.target_encoder(pixels.flatten(0, 1), (state / self.state_scale).flatten(0, 1)).view(b, t, -1)

    @torch.no_grad()
    def update_target(self, decay: float) -> None:
        """After an optimizer step: f̄ ← decay·f̄ + (1 − decay)·f (no-op without an EMA target)."""
        if self.target_encoder is not None:
            for t, o in zip(self.target_encoder.parameters(), self.encoder.parameters()):
                t.lerp_(o, 1.0 - decay)

    def rollout(self, z_hist: torch.Tensor, chunks: torch.Tensor, lang: torch.Tensor) -> torch.Tensor:
        """Imagine H chunks ahead, autoregressively.

        z_hist [B, h, D] (the latest h latents), chunks [B, H, K, A], lang [B, L] or [1, L] (one
        instruction for every candidate: it is then folded into the predictor's weights once) -> [B, H, D].
        """
        h = self.cfg.history
        if z_hist.shape[1] < h:  # at an episode's start, repeat the first latent
            z_hist = torch.cat([z_hist[:, :1].expand(-1, h - z_hist.shape[1], -1), z_hist], dim=1)
        history = z_hist[:, -h:]
        if len(lang) == 1:  # the planner's case: one instruction for every candidate
            return self.predictor.for_instruction(lang).rollout(history, chunks)
        lang_cond = self.predictor.language_condition(lang)
        out = []
        for k in range(chunks.shape[1]):
            z_next = self.predictor.step(history, chunks[:, k], lang_cond)
            out.append(z_next)
            history = torch.cat([history[:, 1:], z_next[:, None]], dim=1)
        return torch.stack(out, dim=1)
