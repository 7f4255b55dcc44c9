"""The VLA: an instruction-conditioned flow-matching policy over action chunks.

    context c   = backbone(pixels_t, state_t, ℓ)                     [B, W]    once per observation
    v(a_τ, τ, c)  = action expert (AdaLN residual MLP)               [B, n, K·A]
    training    a_τ = (1 − τ)·ε + τ·a,   loss ‖v(a_τ, τ, c) − (a − ε)‖²      (rectified flow)
    sampling    a_0 = ε ~ N(0, I),  a_{τ+Δ} = a_τ + Δ·v(a_τ, τ, c)  for flow_steps Euler steps

The planner asks for many candidate chunks per observation, so the transformer backbone runs once
per observation and only the small action expert runs per candidate and per Euler step.

Optional VLA-JEPA auxiliary: `aux_horizon` learned latent-action query tokens join the backbone's
sequence and regress the world model's target latents of the next chunks. They read the current
observation and instruction only (future frames are targets, never inputs), and an attention mask
keeps the observation tokens from reading them, so the context, and thus the policy, is the same
with or without the auxiliary.
"""

from __future__ import annotations

import math
import re
from collections import deque
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .text import token_mask
from .world_model import LANG_DIM, AdaLNBlock

TIME_FEATURES = 64  # sinusoidal features of the flow time τ


@dataclass
class VLAConfig:
    image_size: int = 64
    cameras: int = 1
    state_dim: int = 4
    action_dim: int = 2
    chunk: int = 8  # K: actions per chunk
    backbone: str = "vit"  # vit: a transformer over patches; cnn: FiLM-conditioned convolutions
    width: int = 128  # the backbone's
    depth: int = 4  # transformer layers (vit)
    heads: int = 4
    patch: int = 8  # the conv stem's patch size: (image_size / patch)² image tokens (vit)
    channels: tuple[int, int, int] = (32, 64, 128)  # the cnn's three stages (the last at 1/4 resolution)
    stem: int = 2  # cnn: the first convolution's stride, 2 (3x3, then a stride-2 stage) or 4 (4x4 patches)
    keypoints: int = 32  # spatial soft-argmax keypoints (cnn)
    language_points: int = 0  # soft-argmax points whose 1x1 filters the instruction writes (cnn)
    token_points: bool = False  # the language points' filters read the instruction's tokens, not its pooled embedding
    coarse: bool = True  # the context also reads a coarse 8x8 feature map (cnn)
    expert_width: int = 256  # the action expert's
    expert_blocks: int = 3
    flow_steps: int = 10  # Euler steps at sampling
    flow_samples: int = 1  # training: (τ, ε) draws per demonstration, all sharing one backbone pass
    n_action_steps: int = 8  # the queue select_action refills from one chunk (≤ chunk)
    latent_dim: int = 128  # the world model's latent width, for the auxiliary
    aux_horizon: int = 4  # future chunks the auxiliary predicts
    aux_weight: float = 0.0  # weight of the VLA-JEPA auxiliary loss (0: off)
    where_weight: float = 0.0  # weight of the "where" auxiliary: language points find what is named (0: off)
    true_points: bool = False  # training: the context reads the where targets, not the located points (teacher forcing)
    blank_words: tuple[str, ...] = ()  # words the policy head never reads (the names of things; cnn); empty: all

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)  # a list from JSON or a config file
        self.blank_words = tuple(str(w) for w in self.blank_words)

    def to_dict(self) -> dict:
        return asdict(self)


def batch_language(batch: dict, device: torch.device | str | None = None) -> torch.Tensor:
    """The instruction embedding ℓ of a batch, [B, L] (or [1, L] for one instruction string): its
    `lang` tensor, or its `instruction` strings encoded by the frozen text encoder."""
    return _instruction_input(batch, "lang", "encode", device,
                              f"the batch has neither 'lang' (f32 [B, {LANG_DIM}]) nor 'instruction' (list of B strings)")


def batch_tokens(batch: dict, device: torch.device | str | None = None) -> torch.Tensor:
    """The instruction's token embeddings of a batch, [B (or 1), T, L]: its `lang_tokens` tensor,
    or its `instruction` strings encoded token by token by the frozen text encoder."""
    return _instruction_input(batch, "lang_tokens", "encode_tokens", device,
                              "this VLA reads the instruction token by token (token_points=true): the batch needs "
                              f"'instruction' (B strings) or 'lang_tokens' (f32 [B, T, {LANG_DIM}])")


def blank(text: str, words: tuple[str, ...]) -> str:
    """The instruction with every run of `words` replaced by "thing": "move the yellow cube to the
    red pad" -> "move the thing to the thing pad" (what to do, not with what)."""
    if not words:
        return text
    word = "|".join(re.escape(w) for w in words)
    return re.sub(rf"\b(?:{word})(?:\s+(?:{word}))*\b", "thing", text)


def batch_head_language(batch: dict, words: tuple[str, ...], device=None) -> torch.Tensor:
    """The embedding of the instruction with `words` blanked [B (or 1), L]: the batch's `head_lang`,
    or its `instruction` strings blanked and encoded."""
    if "head_lang" not in batch and "instruction" in batch:
        texts = batch["instruction"]
        batch = {"instruction": [blank(t, words) for t in ([texts] if isinstance(texts, str) else texts)]}
    return _instruction_input(batch, "head_lang", "encode", device,
                              "this VLA's policy head reads the instruction with the names of things blanked "
                              f"(blank_words): the batch needs 'instruction' (B strings) or 'head_lang' (f32 [B, {LANG_DIM}])")


def _instruction_input(batch: dict, key: str, method: str, device, missing: str) -> torch.Tensor:
    """batch[key] as f32, or the batch's `instruction` strings through the text encoder's `method`."""
    if key in batch:
        out = torch.as_tensor(batch[key], dtype=torch.float32)
    elif "instruction" in batch:
        texts = batch["instruction"]
        from .text import get_instruction_encoder  # lazy: loading MiniLM is slow
        out = getattr(get_instruction_encoder(), method)([texts] if isinstance(texts, str) else list(texts))
    else:
        raise ValueError(f"{missing}; it has only {sorted(batch)}: add one of them")
    return out.to(device) if device is not None else out


class Backbone(nn.Module):
    """Image patches + a state token + a language token (+ optional query tokens) -> a pre-norm
    transformer -> the context (mean of the observation tokens) [B, W] and the queries' outputs."""

    def __init__(self, cfg: VLAConfig):
        super().__init__()
        self.stem = nn.Conv2d(3 * cfg.cameras, cfg.width, cfg.patch, stride=cfg.patch)
        self.pos = nn.Parameter(torch.randn(1, (cfg.image_size // cfg.patch) ** 2 + 2, cfg.width) * 0.02)
        self.state = nn.Linear(cfg.state_dim, cfg.width)
        self.language = nn.Linear(LANG_DIM, cfg.width)
        layer = nn.TransformerEncoderLayer(cfg.width, cfg.heads, 4 * cfg.width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.depth, norm=nn.LayerNorm(cfg.width),
                                            enable_nested_tensor=False)  # pre-norm layers cannot use it

    def forward(self, pixels: torch.Tensor, state: torch.Tensor, lang: torch.Tensor,
                queries: torch.Tensor | None = None, lang_tokens: torch.Tensor | None = None,
                true_points: None = None, head_lang: None = None) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        """pixels uint8 [B, V, H, W, 3], state [B, P] (normalised), lang [B, L], queries [Q, W] or
        None (lang_tokens, true_points, head_lang: unused, it has no points and no head) -> context
        [B, W], query outputs [B, Q, W] or None, and no language maps."""
        b, v, h, w, _ = pixels.shape
        x = pixels.permute(0, 1, 4, 2, 3).reshape(b, v * 3, h, w).float() / 127.5 - 1.0
        tokens = torch.cat([self.stem(x).flatten(2).transpose(1, 2), self.state(state)[:, None],
                            self.language(lang)[:, None]], dim=1) + self.pos
        n_obs, mask = tokens.shape[1], None
        if queries is not None:
            tokens = torch.cat([tokens, queries.expand(b, -1, -1)], dim=1)
            mask = torch.zeros(tokens.shape[1], tokens.shape[1], dtype=torch.bool, device=tokens.device)
            mask[:n_obs, n_obs:] = True  # observation tokens never attend to the queries
        out = self.blocks(tokens, mask=mask)
        return out[:, :n_obs].mean(1), (out[:, n_obs:] if queries is not None else None), None


class ConvBackbone(nn.Module):
    """A FiLM-conditioned CNN: the instruction scales and shifts every stage's channels (it says
    which colours matter), then spatial soft-argmax keypoints (where things are; some of them
    steered by the instruction), a coarse 8x8 map and the state go through an MLP to the context
    [B, W]. Query tokens (the auxiliary) read the context only: each is context + its own learned
    embedding."""

    def __init__(self, cfg: VLAConfig):
        super().__init__()
        if cfg.image_size % 8:
            raise ValueError(f"the cnn backbone needs an image size divisible by 8, got {cfg.image_size}")
        if cfg.stem not in (2, 4):
            raise ValueError(f"the cnn stem's stride must be 2 or 4, got {cfg.stem}")
        if len(cfg.channels) != 3 or any(c % 8 for c in cfg.channels):
            raise ValueError(f"the cnn needs 3 channel widths, each a multiple of 8 (its GroupNorm has 8 groups), "
                             f"got {list(cfg.channels)}")
        self.channels = c1, c2, c3 = cfg.channels
        # Both stems reach 1/4 resolution after two stages; the 4x4 one gets there without the
        # half-resolution feature map, whose convolution, norm and activation cost most per pixel.
        stem = (nn.Conv2d(3 * cfg.cameras, c1, 3, stride=2, padding=1) if cfg.stem == 2
                else nn.Conv2d(3 * cfg.cameras, c1, 4, stride=4))
        self.convs = nn.ModuleList([stem, nn.Conv2d(c1, c2, 3, stride=4 // cfg.stem, padding=1),
                                    nn.Conv2d(c2, c3, 3, padding=1)])
        self.norms = nn.ModuleList(nn.GroupNorm(8, c) for c in self.channels)
        self.film = nn.Linear(LANG_DIM, 2 * sum(self.channels))
        nn.init.zeros_(self.film.weight)  # starts as the identity modulation
        nn.init.zeros_(self.film.bias)
        if cfg.keypoints < 0 or cfg.keypoints + cfg.language_points < 1:
            raise ValueError(f"the cnn needs at least one point: keypoints ({cfg.keypoints}) + language_points "
                             f"({cfg.language_points}) must be ≥ 1, and neither negative")
        self.n_keypoints, self.n_language = cfg.keypoints, cfg.language_points
        self.keypoint_maps = nn.Conv2d(c3, cfg.keypoints, 1) if cfg.keypoints else None
        cells = cfg.image_size // 4
        side = (torch.arange(cells) + 0.5) / cells * 2 - 1  # cell centres in image coordinates [-1, 1]
        ys, xs = torch.meshgrid(side, side, indexing="ij")
        self.register_buffer("grid", torch.stack([xs.flatten(), ys.flatten()], dim=1), persistent=False)
        # Language points: the instruction writes 1x1 filters, so a point can follow "the blue cylinder"
        # or "the green pad" wherever it is, which fixed keypoints can only do through FiLM.
        self.language_points = self.point_queries = None
        if cfg.token_points:
            # Each point reads the instruction's tokens through its own attention query (zeros: it
            # starts from their mean) and turns what it read into its filter. The pooled embedding
            # blurs which colour is the pad's (a linear probe on it finds the pad's colour in 54-66%
            # of held-out push-to-pad sentences, attention over the tokens in 100%); the trained
            # VLA's points were no better for it (README, Results).
            self.point_queries = nn.Parameter(torch.zeros(cfg.language_points, LANG_DIM))
            bound = LANG_DIM ** -0.5  # nn.Linear's initial scale
            self.point_filters = nn.Parameter(torch.empty(cfg.language_points, LANG_DIM, c3).uniform_(-bound, bound))
        elif cfg.language_points:
            self.language_points = nn.Linear(LANG_DIM, cfg.language_points * c3)
        self.coarse = nn.Conv2d(c3, 32, 3, stride=2, padding=1) if cfg.coarse else None
        # Where the language points lie relative to one another (object to pusher, pad to object):
        # what the action depends on, given directly rather than left for the head to subtract.
        pairs = torch.triu_indices(cfg.language_points, cfg.language_points, offset=1)
        self.register_buffer("pairs", pairs, persistent=False)
        inputs = (2 * (cfg.keypoints + cfg.language_points + pairs.shape[1]) + cfg.state_dim + LANG_DIM
                  + (32 * (cfg.image_size // 8) ** 2 if cfg.coarse else 0))
        self.head = nn.Sequential(nn.Linear(inputs, 2 * cfg.width), nn.SiLU(), nn.Linear(2 * cfg.width, cfg.width))

    def forward(self, pixels: torch.Tensor, state: torch.Tensor, lang: torch.Tensor,
                queries: torch.Tensor | None = None, lang_tokens: torch.Tensor | None = None,
                true_points: torch.Tensor | None = None, head_lang: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """As `Backbone.forward` (lang_tokens [B, T, L]: the instruction's, needed with token_points), and
        the language points' logits over the feature map's cells [B, language_points, (H/4)·(W/4)]
        (None without language points). The head reads head_lang [B, L] (the instruction with the
        names of things blanked) if given, else lang.

        true_points [B, P, 2] (teacher forcing): the context reads them in place of the located
        language points, and the centre (0, 0) for those unknown (NaN, or past P): where the
        soft-argmax of a flat map lies, and the where auxiliary trains the maps of unknown points
        flat. The context then needs no pixels unless it reads free keypoints or the coarse map, so
        pixels may cover only the first rows (the frames that train perception), or be None."""
        b = len(state)
        if (true_points is None or self.n_keypoints or self.coarse is not None) \
                and (pixels is None or len(pixels) != b):
            raise ValueError(f"pixels cover {0 if pixels is None else len(pixels)} of the {b} rows: only a context "
                             f"from true_points alone (no free keypoints, no coarse map) may do without pixels")
        named, coarse = None, []
        if pixels is not None:
            n, v, h, w, _ = pixels.shape
            x = pixels.permute(0, 1, 4, 2, 3).reshape(n, v * 3, h, w).float() / 127.5 - 1.0
            films = self.film(lang[:n]).split([2 * c for c in self.channels], dim=1)
            for conv, norm, film in zip(self.convs, self.norms, films):
                scale, shift = film[:, :, None, None].chunk(2, dim=1)
                x = F.silu(norm(conv(x)) * (1 + scale) + shift)
            # [n, keypoints, cells]: no rows without free keypoints
            maps = self.keypoint_maps(x).flatten(2) if self.keypoint_maps is not None else x.flatten(2)[:, :0]
            if self.language_points is not None or self.point_queries is not None:
                tokens = lang_tokens[:n] if lang_tokens is not None else None
                filters = self._point_filters(lang[:n], tokens).view(n, -1, x.shape[1])  # [n, language_points, C]
                named = filters @ x.flatten(2) / math.sqrt(x.shape[1])
                maps = torch.cat([maps, named], dim=1)
            keypoints = torch.softmax(maps, dim=-1) @ self.grid  # [n, keypoints (+ language points), 2]
            coarse = [F.silu(self.coarse(x)).flatten(1)] if self.coarse is not None else []
        if true_points is not None:
            taught = F.pad(true_points, (0, 0, 0, self.n_language - true_points.shape[1]), value=float("nan"))
            free = keypoints[:, :self.n_keypoints] if self.n_keypoints else state.new_zeros(b, 0, 2)
            keypoints = torch.cat([free, taught.nan_to_num(0.0)], dim=1)
        points = keypoints[:, self.n_keypoints:]
        relations = points[:, self.pairs[0]] - points[:, self.pairs[1]]  # [B, pairs, 2]
        context = self.head(torch.cat([keypoints.flatten(1), relations.flatten(1), *coarse, state,
                                         lang if head_lang is None else head_lang], dim=1))
        return context, (context[:, None] + queries if queries is not None else None), named

    def _point_filters(self, lang: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
        """The language points' 1x1 filters [B, language_points, C], from the pooled instruction
        embedding, or with token_points from its tokens [B, T, L]."""
        if self.point_queries is None:
            return self.language_points(lang)
        if tokens is None or tokens.ndim != 3 or tokens.shape[0] != len(lang) or tokens.shape[2] != LANG_DIM:
            got = list(tokens.shape) if tokens is not None else None
            raise ValueError(f"token_points needs the instruction's tokens [B, T, L] = [{len(lang)}, T, {LANG_DIM}] "
                             f"(InstructionEncoder.encode_tokens), got {got}")
        scores = (tokens @ self.point_queries.T).transpose(1, 2)  # [B, points, T]
        scores = scores.masked_fill(~token_mask(tokens)[:, None], float("-inf"))
        return torch.einsum("bpl,plc->bpc", scores.softmax(-1) @ tokens, self.point_filters)


def heatmap(points: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Points [N, 2] in image coordinates -> a distribution over the cells whose centres `grid`
    [n·n, 2] lists row by row [N, n·n]: each point spread bilinearly over its four nearest cells,
    so the distribution's mean is the point itself (clamped to the outer cell centres)."""
    n = math.isqrt(len(grid))
    cell = ((points + 1) / 2 * n - 0.5).clamp(0, n - 1)  # continuous (column, row) index
    low = cell.floor().clamp(max=n - 2)
    frac = cell - low
    out = points.new_zeros(len(points), n, n)
    rows = torch.arange(len(points), device=points.device)
    for dy in (0, 1):
        for dx in (0, 1):
            weight = (frac[:, 0] if dx else 1 - frac[:, 0]) * (frac[:, 1] if dy else 1 - frac[:, 1])
            out[rows, (low[:, 1] + dy).long(), (low[:, 0] + dx).long()] += weight
    return out.flatten(1)


class ActionExpert(nn.Module):
    """The velocity v(a_τ, τ, c) over flattened normalised chunks, conditioned by AdaLN-zero on the
    context and τ. The condition is per observation (and τ), so it is computed for B rows and
    broadcast over the n samples of each."""

    def __init__(self, cfg: VLAConfig):
        super().__init__()
        d, h = cfg.chunk * cfg.action_dim, cfg.expert_width
        self.n_blocks = cfg.expert_blocks
        self.inp = nn.Linear(d, h)
        self.context = nn.Linear(cfg.width, h)
        self.time = nn.Sequential(nn.Linear(TIME_FEATURES, h), nn.SiLU(), nn.Linear(h, h))
        self.modulation = nn.Linear(h, 3 * h * (cfg.expert_blocks + 1))
        nn.init.zeros_(self.modulation.weight)  # AdaLN-zero: untrained blocks are the identity
        nn.init.zeros_(self.modulation.bias)
        self.blocks = nn.ModuleList(AdaLNBlock(h, 2 * h) for _ in range(cfg.expert_blocks))
        self.out = nn.Linear(h, d)
        freqs = torch.exp(torch.linspace(0.0, math.log(1000.0), TIME_FEATURES // 2))
        self.register_buffer("freqs", freqs, persistent=False)

    def condition(self, tau: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tau [N], context [N, W] -> (cond [N, h], AdaLN modulation [N, blocks + 1, 3, 1, h]).

        Split from `forward` so that sampling computes every Euler step's condition in one call:
        the modulation layer is the expert's largest, and one row per step would re-read it."""
        angles = tau[:, None] * self.freqs
        cond = F.silu(self.context(context) + self.time(torch.cat([angles.sin(), angles.cos()], dim=1)))
        return cond, self.modulation(cond).view(len(cond), self.n_blocks + 1, 3, 1, -1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        """x [B, n, K·A] and `condition`'s outputs for B rows -> velocity [B, n, K·A] (broadcast over n)."""
        x = self.inp(x) + cond[:, None]
        for i, block in enumerate(self.blocks):
            x = block(x, *mod[:, i].unbind(1))
        shift, scale, _ = mod[:, -1].unbind(1)  # the head's modulation (its gate is unused)
        return self.out(F.layer_norm(x, x.shape[-1:]) * (1 + scale) + shift)


class VLA(nn.Module):
    """π(chunk | observation, instruction), with LeRobot's policy interface and batched sampling."""

    def __init__(self, cfg: VLAConfig):
        super().__init__()
        if cfg.backbone not in ("vit", "cnn"):
            raise ValueError(f"unknown backbone {cfg.backbone!r}; choose vit or cnn")
        if cfg.backbone == "vit" and cfg.image_size % cfg.patch:
            raise ValueError(f"image_size {cfg.image_size} must be divisible by patch {cfg.patch}")
        if not 1 <= cfg.n_action_steps <= cfg.chunk:
            raise ValueError(f"n_action_steps must be in 1..chunk ({cfg.chunk}), got {cfg.n_action_steps}")
        if cfg.flow_steps < 1 or cfg.flow_samples < 1:
            raise ValueError(f"flow_steps and flow_samples must be ≥ 1, got {cfg.flow_steps} and {cfg.flow_samples}")
        self.cfg = cfg
        self.backbone = Backbone(cfg) if cfg.backbone == "vit" else ConvBackbone(cfg)
        self.expert = ActionExpert(cfg)
        # The auxiliary always exists (checkpoints load whatever aux_weight is); it costs nothing when off.
        self.aux_queries = nn.Parameter(torch.randn(cfg.aux_horizon, cfg.width) * 0.02)
        self.aux_head = nn.Linear(cfg.width, cfg.latent_dim)
        if cfg.where_weight > 0 and (cfg.backbone != "cnn" or cfg.language_points < 1):
            raise ValueError("the where auxiliary trains the language points: it needs backbone=cnn and "
                             f"language_points ≥ 1, got backbone={cfg.backbone}, language_points={cfg.language_points}")
        if cfg.true_points and cfg.where_weight <= 0:
            raise ValueError("true_points feeds the where auxiliary's targets to the context: it needs where_weight > 0")
        if cfg.blank_words and cfg.backbone != "cnn":
            raise ValueError("blank_words blanks what the cnn's policy head reads: it needs backbone=cnn")
        if cfg.token_points and (cfg.backbone != "cnn" or cfg.language_points < 1):
            raise ValueError("token_points writes the language points' filters: it needs backbone=cnn and "
                             f"language_points ≥ 1, got backbone={cfg.backbone}, language_points={cfg.language_points}")
        for name, dim in (("action", cfg.action_dim), ("state", cfg.state_dim)):
            self.register_buffer(f"{name}_mean", torch.zeros(dim))
            self.register_buffer(f"{name}_std", torch.ones(dim))
        self._queue: deque[torch.Tensor] = deque()

    @classmethod
    def load(cls, directory) -> "VLA":
        """The VLA saved by `save_checkpoint(directory, {"vla": m}, {"kind": "vla", "model": cfg})`, in eval mode."""
        from .checkpoint import load_model
        return load_model(directory, "vla", lambda c: cls(VLAConfig(**c)))

    @torch.no_grad()
    def set_normalization(self, stats: dict) -> None:
        """Take the dataset's stats, {"state": {"mean": [P], "std": [P]}, "action": {"mean": [A], "std": [A]}}."""
        for name, dim in (("action", self.cfg.action_dim), ("state", self.cfg.state_dim)):
            try:
                mean, std = (torch.as_tensor(stats[name][k], dtype=torch.float32) for k in ("mean", "std"))
            except (KeyError, TypeError) as e:
                raise ValueError(f"stats need {name!r} with 'mean' and 'std' lists (the dataset's stats format); "
                                 f"missing {e}") from e
            if mean.shape != (dim,) or std.shape != (dim,):
                raise ValueError(f"stats[{name!r}] has mean {tuple(mean.shape)} and std {tuple(std.shape)}, "
                                 f"expected ({dim},) each: do the stats come from the dataset this VLA is for?")
            getattr(self, f"{name}_mean").copy_(mean)
            getattr(self, f"{name}_std").copy_(std.clamp_min(1e-3))  # constant dimensions must not blow up

    # ------------------------------------------------------------------ training

    def forward(self, pixels: torch.Tensor, state: torch.Tensor, lang: torch.Tensor, actions: torch.Tensor,
                future_latents: torch.Tensor | None = None, where: torch.Tensor | None = None,
                action_pad: torch.Tensor | None = None, lang_tokens: torch.Tensor | None = None,
                head_lang: torch.Tensor | None = None, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The training losses. pixels uint8 [B, V, H, W, 3], state [B, P], lang [B, L], actions
        [B, K, A] (raw), action_pad bool [B, K] (True: a copy past the episode's end, left out of
        the flow loss; `WindowSampler(pad_end=True)`), future_latents [B, aux_horizon, D] (targets:
        the world model's sg[f̄] of the next chunks' end frames), where [B, P, 2] (targets for the
        first P ≤ language_points points: where the pusher and the things the instruction names
        appear in the image, (u, v) in [-1, 1], NaN if unseen), lang_tokens [B, T, L] (the
        instruction's tokens, `InstructionEncoder.encode_tokens`; needed with token_points), head_lang
        [B, L] (the instruction with blank_words blanked, encoded; needed with blank_words) -> {"flow", "loss"} (+ "jepa" when
        aux_weight > 0, "where" when where_weight > 0, and their targets are given). τ ~ U(0, 1) and ε ~ N(0, I)
        come from `generator`. Rows whose actions are NaN are not demonstrations: they train only
        the "where" auxiliary (points whose `where` is NaN do not). With true_points the policy reads
        no pixels in training, so pixels may cover only the first n ≤ B rows: the CNN and the "where"
        auxiliary see those, the policy learns from all B (a step's cost is mostly the CNN's).

        The "where" auxiliary is privileged supervision at training time only (the policy never
        reads positions): the i-th language point's map is trained, by cross-entropy, to peak on the
        i-th target, so the context carries where the pusher, the object and its pad are, which flow
        matching alone learns slowly from a few hundred push demonstrations. A heatmap target
        generalises to unseen scenes far better than regressing positions from the context did."""
        cfg = self.cfg
        b = len(state)
        self._check(pixels, state[:len(pixels)], lang[:len(pixels)])
        if len(pixels) > b or len(lang) != b:
            raise ValueError(f"state and lang must have a row per window ({b}), and pixels at most that many; "
                             f"got state {b}, lang {len(lang)}, pixels {len(pixels)}")
        if actions.shape != (b, cfg.chunk, cfg.action_dim):
            raise ValueError(f"actions must be [B, K, A] = [{b}, {cfg.chunk}, {cfg.action_dim}], "
                             f"got {list(actions.shape)}")
        demo = torch.isfinite(actions).flatten(1).all(1)
        if not demo.any():
            raise ValueError("no row of the batch has finite actions: at least one demonstration is needed")
        aux = cfg.aux_weight > 0 and future_latents is not None
        if aux and future_latents.shape != (b, cfg.aux_horizon, cfg.latent_dim):
            raise ValueError(f"future_latents must be [B, aux_horizon, latent_dim] = [{b}, "
                             f"{cfg.aux_horizon}, {cfg.latent_dim}], got {list(future_latents.shape)}")
        if cfg.true_points and where is None:
            raise ValueError("this VLA trains on the true points (true_points=true): pass where [B, P, 2]")
        if cfg.blank_words and head_lang is None:
            raise ValueError("this VLA's head reads the instruction with its names blanked (blank_words): pass head_lang")
        context, query_out, named = self.backbone(pixels, self._norm_state(state), lang,
                                                  self.aux_queries if aux else None, lang_tokens,
                                                  where if cfg.true_points else None, head_lang)
        # Several (τ, ε) draws per demonstration: the backbone, most of a step's cost, runs once for
        # all of them, and the flow loss (its noisiest part) averages over more draws.
        m = cfg.flow_samples
        a = ((actions[demo] - self.action_mean) / self.action_std).flatten(1)[:, None].repeat_interleave(m, 0)
        tau = torch.rand(len(a), generator=generator, device=a.device)  # a: [B·m, 1, K·A]
        eps = torch.randn(a.shape, generator=generator, device=a.device)
        a_tau = (1 - tau[:, None, None]) * eps + tau[:, None, None] * a
        cond = self.expert.condition(tau, context[demo].repeat_interleave(m, 0))
        error = (self.expert(a_tau, *cond) - (a - eps)) ** 2
        if action_pad is not None:
            if action_pad.shape != (b, cfg.chunk):
                raise ValueError(f"action_pad must be [B, K] = [{b}, {cfg.chunk}], "
                                 f"got {list(action_pad.shape)}")
            real = (~action_pad[demo]).repeat_interleave(cfg.action_dim, 1).repeat_interleave(m, 0)[:, None].float()
            losses = {"flow": (error * real).sum() / real.sum()}
        else:
            losses = {"flow": error.mean()}
        losses["loss"] = losses["flow"]
        if aux:
            losses["jepa"] = F.mse_loss(self.aux_head(query_out[demo]), future_latents[demo])
            losses["loss"] = losses["loss"] + cfg.aux_weight * losses["jepa"]
        if cfg.where_weight > 0 and where is not None:
            if where.ndim != 3 or where.shape[0] != b or where.shape[2] != 2 \
                    or where.shape[1] > cfg.language_points:
                raise ValueError(f"where must be [B, P, 2] with B = {b} and P ≤ language_points "
                                 f"({cfg.language_points}), got {list(where.shape)}")
            seen = where[:len(named)]  # the rows whose pixels the CNN saw
            known = torch.isfinite(seen).all(2)  # [n, P]
            log_maps = named.log_softmax(-1)  # [n, language_points, cells]
            if cfg.true_points:
                # The context reads the centre for unknown points (the backbone): their maps learn to be
                # flat, whose soft-argmax is the centre, so that at test the head reads what it learnt on.
                target = torch.full_like(log_maps, 1 / log_maps.shape[-1])
                target[:, :seen.shape[1]][known] = heatmap(seen[known], self.backbone.grid)
                losses["where"] = -(target * log_maps).sum() / known.sum().clamp_min(1)
            elif known.any():
                losses["where"] = -(heatmap(seen[known], self.backbone.grid)
                                    * log_maps[:, :seen.shape[1]][known]).sum(1).mean()
            if "where" in losses:
                losses["loss"] = losses["loss"] + cfg.where_weight * losses["where"]
        return losses

    def latent_actions(self, pixels: torch.Tensor, state: torch.Tensor, lang: torch.Tensor,
                       lang_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """The auxiliary's prediction of the next aux_horizon target latents [B, aux_horizon, D],
        from the current observation and instruction only."""
        self._check(pixels, state, lang)
        return self.aux_head(self.backbone(pixels, self._norm_state(state), lang, self.aux_queries, lang_tokens)[1])

    @torch.no_grad()
    def locate(self, pixels: torch.Tensor, state: torch.Tensor, lang: torch.Tensor,
               lang_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Where the language points are [B, language_points, 2], (u, v) in [-1, 1] of the first
        camera's image: with the where auxiliary, the pusher and the things the instruction names."""
        self._check(pixels, state, lang)
        named = self.backbone(pixels, self._norm_state(state), lang, None, lang_tokens)[2]
        if named is None:
            raise ValueError("this VLA has no language points (backbone=cnn with language_points ≥ 1 has them)")
        return named.softmax(-1) @ self.backbone.grid

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def sample_chunks(self, batch: dict, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n chunks per observation: batch {pixels uint8 [B, V, H, W, 3], state [B, P], and lang [B or
        1, L] or instruction (B strings or one); with token_points also lang_tokens [B or 1, T, L],
        with blank_words also head_lang [B or 1, L], or instruction} -> [B, n, K, A] in the env's bounds [-1, 1]."""
        if n < 1:
            raise ValueError(f"n (chunks per observation) must be ≥ 1, got {n}")
        pixels, state = batch.get("pixels"), batch.get("state")
        lang = batch_language(batch, self.action_mean.device)
        tokens = batch_tokens(batch, self.action_mean.device) if self.cfg.token_points else None
        head = batch_head_language(batch, self.cfg.blank_words, self.action_mean.device) if self.cfg.blank_words else None
        if isinstance(pixels, torch.Tensor) and len(lang) == 1:  # one instruction for every observation
            lang = lang.expand(len(pixels), -1)
            tokens = tokens.expand(len(pixels), -1, -1) if tokens is not None and len(tokens) == 1 else tokens
            head = head.expand(len(pixels), -1) if head is not None and len(head) == 1 else head
        self._check(pixels, state, lang)
        context = self.backbone(pixels, self._norm_state(state), lang, None, tokens, None, head)[0]  # once per observation
        b, k, a_dim = len(pixels), self.cfg.chunk, self.cfg.action_dim
        x = torch.randn(b, n, k * a_dim, generator=generator, device=context.device)
        steps = self.cfg.flow_steps
        tau = torch.arange(steps, device=context.device, dtype=context.dtype).repeat_interleave(b) / steps
        cond, mod = self.expert.condition(tau, context.repeat(steps, 1))  # all steps at once: [steps·B, ...]
        for i in range(steps):
            rows = slice(i * b, (i + 1) * b)
            x = x + self.expert(x, cond[rows], mod[rows]) / steps
        actions = x.view(b, n, k, a_dim) * self.action_std + self.action_mean
        return actions.clamp(-1.0, 1.0)

    def instruction_inputs(self, instruction: str, encoder) -> dict[str, torch.Tensor]:
        """What this VLA reads of one instruction besides its pooled embedding, for a caller that
        encodes it once per episode with `encoder`: lang_tokens with token_points, head_lang with
        blank_words."""
        out = {}
        if self.cfg.token_points:
            out["lang_tokens"] = encoder.encode_tokens([instruction])
        if self.cfg.blank_words:
            out["head_lang"] = encoder.encode([blank(instruction, self.cfg.blank_words)])
        return out

    def predict_action_chunk(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """One chunk per observation [B, K, A]."""
        return self.sample_chunks(batch, 1, generator)[:, 0]

    def select_action(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """The next action [B, A]: the first n_action_steps of a chunk are queued and returned in
        order; a new chunk is predicted (from this batch) only when the queue is empty."""
        if not self._queue:
            chunk = self.predict_action_chunk(batch, generator)
            self._queue.extend(chunk[:, : self.cfg.n_action_steps].unbind(1))
        return self._queue.popleft()

    def reset(self) -> None:
        """Forget the queued actions (call at every episode start)."""
        self._queue.clear()

    # ------------------------------------------------------------------ helpers

    def _norm_state(self, state: torch.Tensor) -> torch.Tensor:
        return (state.float() - self.state_mean) / self.state_std

    def _check(self, pixels, state, lang) -> None:
        cfg = self.cfg
        want = (cfg.cameras, cfg.image_size, cfg.image_size, 3)
        if not isinstance(pixels, torch.Tensor) or pixels.dtype != torch.uint8 or pixels.ndim != 5 \
                or tuple(pixels.shape[1:]) != want:
            got = f"{pixels.dtype} {list(pixels.shape)}" if isinstance(pixels, torch.Tensor) else type(pixels).__name__
            raise ValueError(f"pixels must be a uint8 tensor [B, V, H, W, 3] = [B, {', '.join(map(str, want))}], "
                             f"got {got}; add a batch dimension (pixels[None]) to a single observation")
        b = len(pixels)
        if not isinstance(state, torch.Tensor) or state.shape != (b, cfg.state_dim):
            got = list(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__
            raise ValueError(f"state must be a tensor [B, P] = [{b}, {cfg.state_dim}], got {got}")
        if lang.shape != (b, LANG_DIM):
            raise ValueError(f"lang must be [B, L] = [{b}, {LANG_DIM}], got {list(lang.shape)}; "
                             "one instruction embedding per observation")
