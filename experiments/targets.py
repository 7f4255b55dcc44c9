"""What `foresight-train` can train. A target builds its modules from the config and the data:

    modules    {name: nn.Module}, what the checkpoint holds
    objective  nn.Module whose forward(**batch, generator=...) returns a dict with "loss"
    batch(rng, size) -> the objective's keyword arguments (tensors), drawn with `rng`
    after_step()      called after each optimizer step (EMA updates)
    evaluate()        -> {metric: float} on the held-out data
    config()          -> what config.json records
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from envs import TABLETOP_ID
from envs.dataset import EpisodeDataset, WindowSampler
from envs.experts import N_NAMED_POINTS, expert_labels, named_points, replay_infos, subgoals_met
from envs.scene import COLOURS, SHAPES, image_coords
from envs.tasks import REGIONS, TEMPLATES, Subgoal, subgoal_met
from experiments.evaluate import colour_positions
from models import WorldModel, WorldModelConfig, get_instruction_encoder
from models.checkpoint import load_checkpoint
from models.decoder import PixelDecoder, PixelDecoderConfig, world_model_digest
from models.done import DoneModel, DoneModelConfig
from models.goal import GoalModel, GoalModelConfig, gaussian_nll
from models.objectives import PredictorObjective, WorldModelLossConfig, WorldModelObjective
from models.vla import VLA, VLAConfig, blank
from planner.subgoals import split_instruction


def make_target(cfg: DictConfig):
    targets = {"world_model": WorldModelTarget, "predictor": PredictorTarget, "goal": GoalTarget, "done": DoneTarget,
               "vla": VLATarget, "decoder": DecoderTarget}
    if cfg.target.name not in targets:
        raise ValueError(f"unknown target {cfg.target.name!r}; choose one of {', '.join(targets)}")
    return targets[cfg.target.name](cfg)


def open_dataset(path: str) -> EpisodeDataset:
    if not Path(path).exists():
        raise FileNotFoundError(f"no dataset at {path}; collect one first, e.g. "
                                f"foresight-collect episodes=1000 policy=mixture out={path}")
    return EpisodeDataset(path, load=True)


def training_datasets(cfg: DictConfig) -> list[EpisodeDataset]:
    """`data` and the target's `extra_data` (done and predictor targets), loaded."""
    return [open_dataset(path) for path in [cfg.data, *cfg.target.extra_data]]


def instruction_table(ds: EpisodeDataset, blank_words: tuple[str, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Per episode: the instruction embedding [E, L] (of the text with `blank_words` blanked) and
    an id per distinct text [E]."""
    texts, ids = _distinct_instructions(ds)
    return get_instruction_encoder().encode([blank(t, blank_words) for t in texts])[ids], ids


def instruction_tokens(ds: EpisodeDataset) -> torch.Tensor:
    """Per episode: the instruction's token embeddings [E, T, L], zero-padded (for token_points)."""
    texts, ids = _distinct_instructions(ds)
    return get_instruction_encoder().encode_tokens(texts)[ids]


def _distinct_instructions(ds: EpisodeDataset) -> tuple[list[str], torch.Tensor]:
    """The dataset's distinct instruction texts, sorted, and each episode's index among them [E]."""
    texts = sorted(set(ds.instructions))
    index = {text: i for i, text in enumerate(texts)}
    return texts, torch.tensor([index[s] for s in ds.instructions])


def _build(seed: int, make):
    """Build modules from `seed` alone (every rank gets the same initial weights)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return make()


class WorldModelTarget:
    def __init__(self, cfg: DictConfig):
        t = cfg.target
        self.cfg = cfg
        self.train_ds, self.eval_ds = open_dataset(cfg.data), open_dataset(cfg.eval_data)
        _, views, height, width, _ = self.train_ds.frames["pixels"].shape
        if height != width:
            raise ValueError(f"the world model wants square frames; {cfg.data} has {height}x{width}")
        self.loss_cfg = WorldModelLossConfig(**t.loss, pad_colours=len(COLOURS))
        self.model_cfg = WorldModelConfig(
            **t.model, image_size=height, cameras=views, state_dim=self.train_ds.frames["state"].shape[1],
            action_dim=self.train_ds.frames["action"].shape[1], ema_target=self.loss_cfg.regularizer == "ema",
            state_scale=self.train_ds.frames["state"].std(0).clip(min=1e-3).tolist() if t.scale_state else None)
        self.objective = _build(cfg.seed, lambda: WorldModelObjective(WorldModel(self.model_cfg), self.loss_cfg))
        self.model = self.objective.model
        self.modules = {"world_model": self.model}
        self.training_heads = self.objective.training_heads()
        k, h = self.model_cfg.chunk, self.model_cfg.history
        self.sampler = WindowSampler(self.train_ds, history=h, horizon=t.horizon, chunk=k, stride=k)
        self.lang, _ = instruction_table(self.train_ds)
        # The pad term's privileged targets: each episode's pads, by colour (they never move).
        self.pads = episode_pads(self.train_ds) if self.loss_cfg.pads > 0 else None
        eval_sampler = WindowSampler(self.eval_ds, history=h, horizon=t.horizon, chunk=k, stride=k)
        self.eval_windows = eval_sampler.sample(np.random.default_rng(0), t.eval_windows)
        self.eval_lang, _ = instruction_table(self.eval_ds)

    def batch(self, rng: np.random.Generator, size: int) -> dict[str, torch.Tensor]:
        windows = self.sampler.sample(rng, size)
        out = window_tensors(windows, self.lang)
        if self.pads is not None:
            out["pads"] = self.pads[torch.from_numpy(windows.episode)]
        return out

    def after_step(self) -> None:
        self.objective.after_step()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Open-loop latent error per horizon on held-out windows, beside the copy-last baseline."""
        model_errs, copy_errs, _ = rollout_errors(self.model, window_tensors(self.eval_windows, self.eval_lang))
        out = {}
        for k, (model_err, copy_err) in enumerate(zip(model_errs, copy_errs), 1):
            out[f"rollout_h{k}"], out[f"copy_last_h{k}"] = model_err, copy_err
            out[f"ratio_h{k}"] = model_err / copy_err
        return out

    def config(self) -> dict:
        return {"kind": "world_model", "model": self.model_cfg.to_dict(), "loss": self.loss_cfg.to_dict(),
                "train": OmegaConf.to_container(self.cfg.target), "data": str(self.cfg.data),
                "seed": self.cfg.seed}


class PredictorTarget:
    """A trained world model's predictor fine-tuned on frozen latents (every frame encoded once) of
    `data` and any `extra_data` (windows from each in proportion to its episodes) to roll out
    `horizon` chunks, far beyond the recipe's 4. A window may start at any frame and run
    past its episode's end: there the pusher rests (the dataset's zero actions) and the scene holds
    (the outcome frame's latent), which is what foresight-score asks of a rollout over a task's whole
    step budget; a share `start_share` of the windows start at the episode's first frame, where
    foresight-score starts. With `done` (a done model's checkpoint), the objective also asks that the
    done model's reading of each imagined latent match, for each clause of the window's instruction,
    its reading of the real one (done_target=reading) or whether the clause holds in the real frame,
    from the privileged state (done_target=truth: the done model's own kind of label); see
    models/objectives.py. The encoder is copied unchanged, so goal and done models trained on it still fit."""

    def __init__(self, cfg: DictConfig):
        self.cfg, t = cfg, cfg.target
        self.model = WorldModel.load(cfg.world_model)
        # What config.json records: the starting model's own record (read once, not at every checkpoint).
        saved = load_checkpoint(cfg.world_model)[1]
        self.saved = {k: v for k, v in saved.items() if k not in ("format", "format_version", "extra")}
        if t.get("predictor"):  # a predictor of another size, trained afresh on the same encoder
            self.model = with_fresh_predictor(self.model, **t.predictor)
            self.saved["model"] = self.model.cfg.to_dict()
        if t.done_target not in ("reading", "truth"):
            raise ValueError(f"target.done_target must be reading or truth, got {t.done_target!r}")
        done = DoneModel.load(t.done) if t.done else None
        self.objective = PredictorObjective(self.model, done, t.done_weight)
        self.modules = {"world_model": self.model}
        self.train_sets = [(ds, self._encoded(ds)) for ds in training_datasets(cfg)]
        self.eval_ds = open_dataset(cfg.eval_data)
        self.eval_batch = resting_windows(self.eval_ds, *self._encoded(self.eval_ds), np.random.default_rng(0),
                                          t.eval_windows, self.model.cfg, t.horizon, t.start_share, t.cut_share)

    def _encoded(self, ds: EpisodeDataset) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
        """Every frame's latent [N, D], each episode's instruction [E, L] and, for the done term, the
        clauses (and, with done_target=truth, whether each holds in each frame)."""
        z = encode_frames(self.model, ds, np.arange(len(ds.frames["state"])))
        if self.objective.done_model is None:
            return z, instruction_table(ds)[0], None
        truth = clause_truth(ds) if self.cfg.target.done_target == "truth" else None
        return z, instruction_table(ds)[0], (*clause_table(ds), truth)

    def batch(self, rng: np.random.Generator, size: int) -> dict[str, torch.Tensor]:
        t = self.cfg.target
        counts = rows_per_dataset([ds for ds, _ in self.train_sets], size)
        return merge_windows([resting_windows(ds, *data, rng, int(n), self.model.cfg, t.horizon, t.start_share,
                                              t.cut_share) for (ds, data), n in zip(self.train_sets, counts) if n])

    def after_step(self) -> None:
        pass

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Open-loop latent error on held-out windows at 1, 4 and `horizon` chunks, beside copy-last;
        with a done model, how far its reading of the last imagined latent is from its reading of the
        real one (and, with done_target=truth, from the truth)."""
        b, h = self.eval_batch, self.model.cfg.history
        pred = self.model.rollout(b["z"][:, :h], b["actions"], b["lang"])
        out = {}
        for k in sorted({1, min(4, len(pred[0])), len(pred[0])}):
            target = b["z"][:, h + k - 1]
            out[f"rollout_h{k}"] = float(((pred[:, k - 1] - target) ** 2).mean())
            out[f"ratio_h{k}"] = out[f"rollout_h{k}"] / float(((b["z"][:, h - 1] - target) ** 2).mean())
        if self.objective.done_model is not None:  # the done model's reading of the last imagined latent, off
            p = torch.sigmoid(self.objective.clause_logits(torch.stack([pred[:, -1], b["z"][:, -1]], 1), b["clauses"]))
            mask, n = b["clause_mask"], len(pred[0])
            out[f"done_gap_h{n}"] = float(((p[:, 0] - p[:, 1]).abs() * mask).sum() / mask.sum())  # its real reading
            if "clause_truth" in b:  # and the truth
                out[f"done_truth_gap_h{n}"] = float(((p[:, 0] - b["clause_truth"][:, -1]).abs() * mask).sum() / mask.sum())
        return out

    def config(self) -> dict:
        return {**self.saved, "predictor": {"train": OmegaConf.to_container(self.cfg.target), "data": str(self.cfg.data),
                                             "world_model": str(self.cfg.world_model), "seed": self.cfg.seed}}


def with_fresh_predictor(model: WorldModel, **size) -> WorldModel:
    """`model`'s encoder with a new, untrained predictor of another size (width, blocks, mlp_ratio,
    cond_dim): offline scoring has no planner budget to keep, so its predictor may be larger."""
    unknown = set(size) - {"width", "blocks", "mlp_ratio", "cond_dim"}
    if unknown:
        raise ValueError(f"target.predictor sets the predictor's width, blocks, mlp_ratio or cond_dim, not {sorted(unknown)}")
    fresh = WorldModel(dataclasses.replace(model.cfg, **size))
    kept = {k: v for k, v in model.state_dict().items() if not k.startswith("predictor.")}
    fresh.load_state_dict(kept, strict=False)  # the encoder (and any EMA target); the predictor stays new
    return fresh


def clause_table(ds: EpisodeDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Per episode, its instruction's clauses (planner/subgoals.py), embedded and zero-padded
    [E, C, L], and which exist [E, C]."""
    clauses = [split_instruction(text) for text in ds.instructions]
    vocabulary = sorted({c for cs in clauses for c in cs})
    lang = get_instruction_encoder().encode(vocabulary)
    index = {text: i for i, text in enumerate(vocabulary)}
    table, mask = torch.zeros(len(ds), max(map(len, clauses)), lang.shape[1]), torch.zeros(len(ds), max(map(len, clauses)))
    for e, cs in enumerate(clauses):
        table[e, :len(cs)], mask[e, :len(cs)] = lang[[index[c] for c in cs]], 1.0
    return table, mask


def clause_truth(ds: EpisodeDataset) -> torch.Tensor:
    """Per frame of a loaded dataset, whether each clause of its episode's instruction holds there,
    from the privileged state [N, C] (clause_table's order: the task's subgoals, in order)."""
    objects, pads, pusher = (ds.frames[f"privileged/{k}"] for k in ("object_pos", "pad_pos", "pusher_pos"))
    tasks = [ds.task(e) for e in range(len(ds))]  # each parsed once
    truth = torch.zeros(len(objects), max(len(task["subgoals"]) for task in tasks))
    for e, (text, task) in enumerate(zip(ds.instructions, tasks)):
        frames = slice(int(ds.starts[e]), int(ds.starts[e] + ds.lengths[e]) + 1)
        clauses = len(split_instruction(text))
        if clauses != len(task["subgoals"]):
            raise ValueError(f"episode {e}'s instruction {text!r} splits into {clauses} clauses but its task has "
                             f"{len(task['subgoals'])} subgoals; planner/subgoals.py must learn its form")
        truth[frames, :clauses] = torch.from_numpy(subgoals_met(task, objects[frames], pads[frames], pusher[frames])).float()
    return truth


def resting_windows(ds: EpisodeDataset, z: torch.Tensor, lang: torch.Tensor, clauses: tuple | None,
                    rng: np.random.Generator, size: int, c: WorldModelConfig, horizon: int,
                    start_share: float = 0.0, cut_share: float = 0.0) -> dict[str, torch.Tensor]:
    """PredictorObjective's batch: windows from a random frame (with an action ahead; the episode's
    first with probability start_share) of random episodes, z [B, h + H, D] from the frames' latents
    z [N, D] and actions [B, H, K, A]; where a window runs past its episode's outcome, the actions are
    zero and the outcome's latent holds. With probability cut_share the pusher stops at a random frame
    before the outcome instead (the scene then holds there too): in recorded data only a success
    stops early, so without cuts a rest after few actions would say "success" by itself. With clauses
    (clause_table's, and clause_truth's or None), each window's clauses and, with truth, whether each
    holds after each chunk [B, H, C]."""
    e = rng.integers(len(ds), size=size)
    start, outcome = ds.starts[e][:, None], (ds.starts[e] + ds.lengths[e])[:, None]
    t = start + (rng.random((size, 1)) * ds.lengths[e][:, None]).astype(np.int64)
    t = np.where(rng.random((size, 1)) < start_share, start, t)
    cut = t + 1 + (rng.random((size, 1)) * (outcome - t)).astype(np.int64)  # 1 .. outcome - t actions
    end = np.where(rng.random((size, 1)) < cut_share, cut, outcome)
    frames = np.clip(t + np.arange(1 - c.history, horizon + 1) * c.chunk, start, end)
    steps = t + np.arange(horizon * c.chunk)
    acting = torch.from_numpy(steps < end)[..., None]  # the pusher rests from the end frame on
    actions = (torch.from_numpy(ds.frames["action"][np.minimum(steps, outcome)]) * acting).view(size, horizon, c.chunk, -1)
    out = {"z": z[frames], "actions": actions, "lang": lang[e]}
    if clauses is not None:
        out["clauses"], out["clause_mask"] = clauses[0][e], clauses[1][e]
        if clauses[2] is not None:
            out["clause_truth"] = clauses[2][frames[:, c.history:]]
    return out


def rows_per_dataset(datasets: list[EpisodeDataset], n: int) -> np.ndarray:
    """n rows (or windows) split across datasets in proportion to their episodes."""
    episodes = np.cumsum([0] + [len(ds) for ds in datasets])
    return np.diff(np.round(episodes / episodes[-1] * n).astype(np.int64))


def merge_windows(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """resting_windows' batches of several datasets as one; the clause axis (the last, but for the
    embeddings' second) is zero-padded to the most clauses any has, masked out by clause_mask."""
    if len(parts) == 1:
        return parts[0]
    out = {}
    for key in parts[0]:
        axis = 1 if key == "clauses" else -1
        most = max(p[key].shape[axis] for p in parts) if key.startswith("clause") else None
        padded = []
        for p in parts:
            x = p[key]
            if most is not None and x.shape[axis] < most:
                shape = list(x.shape)
                shape[axis] = most - x.shape[axis]
                x = torch.cat([x, x.new_zeros(shape)], dim=axis)
            padded.append(x)
        out[key] = torch.cat(padded)
    return out


def episode_pads(ds: EpisodeDataset) -> torch.Tensor:
    """xy of each pad colour in each episode [E, len(COLOURS), 2], NaN where the episode has none."""
    return torch.tensor(colour_positions(ds, ds.starts.astype(np.int64), np.arange(len(ds)), "pads"), dtype=torch.float32)


def window_tensors(w, lang_table: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"pixels": torch.from_numpy(w.pixels), "state": torch.from_numpy(w.state),
            "actions": torch.from_numpy(w.actions), "future_pixels": torch.from_numpy(w.future_pixels),
            "future_state": torch.from_numpy(w.future_state), "lang": lang_table[torch.from_numpy(w.episode)]}


@torch.no_grad()
def rollout_errors(model: WorldModel, batch: dict[str, torch.Tensor], chunk: int = 128) -> tuple[list, list, torch.Tensor]:
    """Mean squared latent error per horizon of the open-loop rollout and of copying the last latent,
    against the target latents of the frames after each chunk; and the imagined latents [B, H, D]."""
    sums_model, sums_copy, imagined = 0.0, 0.0, []
    for lo in range(0, len(batch["pixels"]), chunk):
        b = {k: v[lo:lo + chunk] for k, v in batch.items()}
        z = model.encode(b["pixels"], b["state"])
        target = model.encode_target(b["future_pixels"], b["future_state"])
        pred = model.rollout(z, b["actions"], b["lang"])
        sums_model = sums_model + ((pred - target) ** 2).mean(-1).sum(0)
        sums_copy = sums_copy + ((z[:, -1:] - target) ** 2).mean(-1).sum(0)
        imagined.append(pred)
    n = len(batch["pixels"])
    return (sums_model / n).tolist(), (sums_copy / n).tolist(), torch.cat(imagined)


@torch.no_grad()
def encode_frames(model: WorldModel, ds: EpisodeDataset, frames: np.ndarray, batch: int = 512) -> torch.Tensor:
    """Target latents [N, D] of a loaded dataset's frames (indices), encoded `batch` at a time."""
    px, st = ds.frames["pixels"], ds.frames["state"]
    return torch.cat([model.encode_target(torch.from_numpy(px[frames[i:i + batch]])[None],
                                          torch.from_numpy(st[frames[i:i + batch]])[None])[0]
                      for i in range(0, len(frames), batch)])


class GoalTarget:
    """The goal model and language critic, on latents of the frozen world model's target encoder."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        world_model = WorldModel.load(cfg.world_model)
        self.model_cfg = GoalModelConfig(**cfg.target.model, latent_dim=world_model.cfg.latent_dim)
        self.model = _build(cfg.seed, lambda: GoalModel(self.model_cfg))
        self.objective, self.modules = self.model, {"goal": self.model}
        # The value learns from failures too; the goal and critic only ever see successful episodes.
        only_successful = not self.model_cfg.value
        self.train = EncodedEpisodes(world_model, open_dataset(cfg.data), only_successful)
        self.eval = EncodedEpisodes(world_model, open_dataset(cfg.eval_data), only_successful)

    def batch(self, rng: np.random.Generator, size: int) -> dict[str, torch.Tensor]:
        e = rng.integers(len(self.train), size=size)
        t = (rng.random(size) * self.train.lengths[e]).astype(np.int64)  # any frame before the last
        return self.train.batch(e, t)

    def after_step(self) -> None:
        pass

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        return goal_metrics(self.model, self.eval)

    def config(self) -> dict:
        return {"kind": "goal", "model": self.model_cfg.to_dict(), "train": OmegaConf.to_container(self.cfg.target),
                "data": str(self.cfg.data), "world_model": str(self.cfg.world_model), "seed": self.cfg.seed}


class DoneTarget:
    """The done model (models/done.py), on latents of the frozen world model's target encoder, from
    frames of every episode relabelled for one-step instructions their scenes admit."""

    def __init__(self, cfg: DictConfig):
        self.cfg, t = cfg, cfg.target
        world_model = WorldModel.load(cfg.world_model)
        self.model_cfg = DoneModelConfig(**t.model, latent_dim=world_model.cfg.latent_dim)
        self.model = _build(cfg.seed, lambda: DoneModel(self.model_cfg))
        self.objective, self.modules = self.model, {"done": self.model}
        self.train = SubgoalFrames(world_model, training_datasets(cfg), np.random.default_rng([cfg.seed, 1]), t.examples)
        self.eval = SubgoalFrames(world_model, [open_dataset(cfg.eval_data)], np.random.default_rng(1), t.eval_examples)

    def batch(self, rng: np.random.Generator, size: int) -> dict[str, torch.Tensor]:
        return self.train.batch(rng.integers(len(self.train), size=size))

    def after_step(self) -> None:
        pass

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        return done_metrics(self.model, self.eval)

    def config(self) -> dict:
        return {"kind": "done", "model": self.model_cfg.to_dict(), "train": OmegaConf.to_container(self.cfg.target),
                "data": str(self.cfg.data), "world_model": str(self.cfg.world_model), "seed": self.cfg.seed}


class DecoderTarget:
    """The pixel decoder (for viewing only), on frames encoded by the frozen world model's target
    encoder as each batch is drawn; the first camera's image is the reconstruction target."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.world_model = WorldModel.load(cfg.world_model)
        size = self.world_model.cfg.image_size
        self.model_cfg = PixelDecoderConfig(**cfg.target.model, latent_dim=self.world_model.cfg.latent_dim,
                                            image_size=size, world_model=world_model_digest(cfg.world_model))
        self.model = _build(cfg.seed, lambda: PixelDecoder(self.model_cfg))
        self.objective, self.modules = self.model, {"decoder": self.model}
        self.train_ds, eval_ds = open_dataset(cfg.data), open_dataset(cfg.eval_data)
        for ds in (self.train_ds, eval_ds):
            if ds.frames["pixels"].shape[2:4] != (size, size):
                raise ValueError(f"{ds.path} has frames of {ds.frames['pixels'].shape[2:4]} pixels but the world "
                                 f"model {cfg.world_model} takes {size}x{size}")
        rng = np.random.default_rng(0)
        n_eval = len(eval_ds.frames["pixels"])
        self.eval_batch = self._frames(eval_ds, np.sort(rng.choice(n_eval, min(cfg.target.eval_frames, n_eval),
                                                                   replace=False)))
        # Baseline: the mean training frame, the best a decoder that ignores its latent can do.
        some = rng.integers(len(self.train_ds.frames["pixels"]), size=4096)
        self.mean_frame = torch.from_numpy(self.train_ds.frames["pixels"][some, 0]).float().mean(0) / 255

    def _frames(self, ds: EpisodeDataset, frames: np.ndarray) -> dict[str, torch.Tensor]:
        pixels = torch.from_numpy(ds.frames["pixels"][frames])
        z = self.world_model.encode_target(pixels[None], torch.from_numpy(ds.frames["state"][frames])[None])[0]
        return {"z": z, "pixels": pixels[:, 0]}

    def batch(self, rng: np.random.Generator, size: int) -> dict[str, torch.Tensor]:
        return self._frames(self.train_ds, rng.integers(len(self.train_ds.frames["pixels"]), size=size))

    def after_step(self) -> None:
        pass

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out pixel MSE (on [0, 1]) and PSNR (dB), beside those of the mean training frame."""
        z, target = self.eval_batch["z"], self.eval_batch["pixels"].float() / 255
        decoded = torch.cat([self.model.images(part) for part in z.split(256)])
        mse, mse_mean = float(((decoded - target) ** 2).mean()), float(((self.mean_frame - target) ** 2).mean())
        return {"mse": mse, "psnr": -10 * np.log10(mse), "mse_mean_frame": mse_mean,
                "psnr_mean_frame": -10 * np.log10(mse_mean), "frames": float(len(z))}

    def config(self) -> dict:
        return {"kind": "decoder", "model": self.model_cfg.to_dict(),
                "train": OmegaConf.to_container(self.cfg.target), "data": str(self.cfg.data),
                "world_model": str(self.cfg.world_model), "seed": self.cfg.seed}


class EncodedEpisodes:
    """Target latents of every frame of a dataset's episodes (or only its successful ones), with
    their instructions and outcomes."""

    def __init__(self, world_model: WorldModel, ds: EpisodeDataset, only_successful: bool = True):
        if ds.success.sum() < 2:
            raise ValueError(f"{ds.path} has {ds.success.sum()} successful episodes; the goal model needs more")
        keep = np.flatnonzero(ds.success) if only_successful else np.arange(len(ds.lengths))
        lang, ids = instruction_table(ds)
        self.lang, self.ids = lang[keep], ids[keep]
        self.lengths, self.success = ds.lengths[keep], ds.success[keep].astype(bool)
        frames = np.concatenate([np.arange(ds.starts[i], ds.starts[i] + ds.lengths[i] + 1) for i in keep])
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths + 1)[:-1]])
        self.z = encode_frames(world_model, ds, frames)

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, e: np.ndarray, t: np.ndarray) -> dict[str, torch.Tensor]:
        """Episodes `e` (indices among the kept ones) at frames `t`."""
        return {"lang": self.lang[e], "instruction_ids": self.ids[e],
                "z_now": self.z[self.offsets[e] + t], "z_final": self.z[self.offsets[e] + self.lengths[e]],
                "to_go": torch.from_numpy(self.lengths[e] - t), "success": torch.from_numpy(self.success[e])}


# The one-step family whose instructions name a subgoal of each kind.
FAMILY_OF_KIND = {"touch": "reach", "pad": "push_to_pad", "region": "push_to_region"}


def relabel_subgoals(ds: EpisodeDataset, rng: np.random.Generator, n: int, own_share: float = 0.5
                     ) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """n random frames of a loaded dataset, each with a one-step instruction its scene admits and
    whether that instruction holds in the frame, from the privileged state: (frame indices [n],
    instruction texts, subgoal kinds [n], labels bool [n]). A share `own_share` of the rows take one
    of the episode's own subgoals (so the frames around success are covered), the rest a random
    one: touch an object of the scene, or push it into any region or onto any pad of the scene."""
    e = rng.integers(len(ds), size=n)
    frames = ds.starts[e] + (rng.random(n) * (ds.lengths[e] + 1)).astype(np.int64)
    objects, pads = ds.frames["privileged/object_pos"], ds.frames["privileged/pad_pos"]
    pusher, regions = ds.frames["privileged/pusher_pos"], list(REGIONS)
    texts, kinds, labels = [], [], np.zeros(n, dtype=bool)
    for i, (episode, f) in enumerate(zip(e, frames)):
        task = ds.task(int(episode))
        names, pad_colours = task["objects"], task["pads"]
        if rng.random() < own_share:
            sub = task["subgoals"][rng.integers(len(task["subgoals"]))]
            obj, kind, target = names.index(sub["object"]), sub["kind"], sub["target"]
        else:
            kind = ("touch", "region", "pad")[rng.integers(3 if pad_colours else 2)]
            obj = int(rng.integers(len(names)))
            # A target is drawn for every kind, used or not: the shipped done model's rows were drawn so.
            drawn = {"touch": "", "region": regions[rng.integers(len(regions))],
                     "pad": pad_colours[rng.integers(len(pad_colours))] if pad_colours else ""}
            target = drawn[kind]
        templates = TEMPLATES[FAMILY_OF_KIND[kind]]["train"]
        texts.append(templates[rng.integers(len(templates))].format(obj=names[obj], pad=target, region=target))
        kinds.append(kind)
        labels[i] = subgoal_met(Subgoal(obj, kind, target), objects[f, :len(names), :2], pusher[f],
                                {c: pads[f, j] for j, c in enumerate(pad_colours)})
    return frames, texts, np.array(kinds), labels


class SubgoalFrames:
    """relabel_subgoals' rows as the done model's batches: target latents of the frames (each frame
    encoded once) and the instructions' embeddings (each text encoded once). Of several datasets,
    each gives rows in proportion to its episodes."""

    def __init__(self, world_model: WorldModel, datasets: list[EpisodeDataset], rng: np.random.Generator, n: int):
        z, frame_rows, texts, kinds, labels = [], [], [], [], []
        for ds, count in zip(datasets, rows_per_dataset(datasets, n)):
            frames, ds_texts, ds_kinds, ds_labels = relabel_subgoals(ds, rng, int(count))
            unique, rows = np.unique(frames, return_inverse=True)
            frame_rows.append(rows + sum(len(part) for part in z))
            z.append(encode_frames(world_model, ds, unique))
            texts += ds_texts
            kinds.append(ds_kinds)
            labels.append(ds_labels)
        self.z, self.frame_row, self.kinds = torch.cat(z), np.concatenate(frame_rows), np.concatenate(kinds)
        vocabulary = sorted(set(texts))
        index = {text: i for i, text in enumerate(vocabulary)}
        self.lang, self.text_row = get_instruction_encoder().encode(vocabulary), np.array([index[t] for t in texts])
        self.labels = torch.from_numpy(np.concatenate(labels))

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        return {"z": self.z[self.frame_row[rows]], "lang": self.lang[self.text_row[rows]], "label": self.labels[rows]}


@torch.no_grad()
def done_metrics(model: DoneModel, frames: SubgoalFrames) -> dict[str, float]:
    """The done model on held-out relabelled frames: AUROC and accuracy (at p = 0.5) per subgoal kind."""
    from experiments.score import ranking_metrics

    b = frames.batch(np.arange(len(frames)))
    logit = torch.cat([model.logit(z, lang) for z, lang in zip(b["z"].split(4096), b["lang"].split(4096))])
    out = {}
    for kind in FAMILY_OF_KIND:
        rows = frames.kinds == kind
        label = b["label"][rows].numpy()
        out[f"done_auroc_{kind}"] = ranking_metrics(logit[rows].numpy(), label, None, resamples=0)["auroc"]
        out[f"done_accuracy_{kind}"] = float(((logit[rows] > 0).numpy() == label).mean())
        out[f"done_positive_{kind}"] = float(label.mean())
    return out


@torch.no_grad()
def goal_metrics(model: GoalModel, episodes: EncodedEpisodes) -> dict[str, float]:
    """From each episode's first frame: is G(ℓ, z_0) nearer its own final latent than those of
    episodes with other instructions (share of such pairs, and of episodes where it beats all of
    them)? z_0 itself as the goal is the baseline. Also the critic: does it pick the episode's own
    instruction for the final latent, and score the final state above the first? And the final
    latent's NLL under the predicted Gaussian, and the value where the model has that head."""
    e = np.flatnonzero(episodes.success)
    b = episodes.batch(e, np.zeros_like(e))
    other = b["instruction_ids"][:, None] != b["instruction_ids"][None, :]

    def retrieval(goal):
        d = torch.cdist(goal, b["z_final"]) ** 2
        own = d.diagonal()[:, None]
        wins = (own < d) & other
        return ((wins.sum(1) / other.sum(1).clamp(min=1)).mean().item(),
                (wins.sum(1) == other.sum(1)).float().mean().item())

    mean, log_var = model.predict(b["lang"], b["z_now"])
    pairwise, top1 = retrieval(mean)
    pairwise_copy, _ = retrieval(b["z_now"])
    texts = torch.unique(b["instruction_ids"])
    first = {int(i): int(np.flatnonzero(b["instruction_ids"].numpy() == int(i))[0]) for i in texts}
    lang_of_text = b["lang"][[first[int(i)] for i in texts]]
    scores = torch.stack([model.score(b["z_final"], lang_of_text[j:j + 1]) for j in range(len(texts))], 1)
    critic_top1 = (texts[scores.argmax(1)] == b["instruction_ids"]).float().mean().item()
    order = (model.score(b["z_final"], b["lang"]) > model.score(b["z_now"], b["lang"])).float().mean().item()
    return {"goal_mse": torch.nn.functional.mse_loss(mean, b["z_final"]).item(),
            "goal_nll": (gaussian_nll(b["z_final"], mean, log_var) / mean.shape[-1]).mean().item(),
            "retrieval_pairwise": pairwise, "retrieval_top1": top1, "retrieval_pairwise_copy_z0": pairwise_copy,
            "critic_instruction_top1": critic_top1, "critic_final_above_first": order, "episodes": float(len(e)),
            **(value_metrics(model, episodes) if model.value_net is not None else {})}


@torch.no_grad()
def value_metrics(model: GoalModel, episodes: EncodedEpisodes) -> dict[str, float]:
    """The value head: steps-to-go on every frame of the successful episodes (mean absolute error in
    steps, Spearman's ρ), and how well the value tells successful episodes from failed ones (AUROC)
    at their first and at their last frame."""
    from scipy.stats import spearmanr
    from experiments.score import ranking_metrics

    ok = np.flatnonzero(episodes.success)
    e = np.repeat(ok, episodes.lengths[ok] + 1)
    t = np.concatenate([np.arange(n + 1) for n in episodes.lengths[ok]])
    b = episodes.batch(e, t)
    pred = torch.cat([model.steps_to_go(z, lang) for z, lang in zip(b["z_now"].split(4096), b["lang"].split(4096))])
    out = {"to_go_mae_steps": (pred - b["to_go"]).abs().mean().item(),
           "to_go_spearman": float(spearmanr(pred.numpy(), b["to_go"].numpy()).statistic)}
    every = np.arange(len(episodes))
    for name, frames in (("first", np.zeros_like(every)), ("last", episodes.lengths)):
        b = episodes.batch(every, frames)
        auroc = ranking_metrics(model.value(b["z_now"], b["lang"]).numpy(), episodes.success, None, resamples=0)["auroc"]
        out[f"value_auroc_{name}"] = auroc
    return out


def random_shift(pixels: np.ndarray, pad: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Augmentation: each image [B, V, H, W, 3] shifted by up to `pad` pixels (edges repeated).
    Returns the images and how far their content moved, [B, 2] as (right, down) pixels."""
    b, _, h, w, _ = pixels.shape
    padded = np.pad(pixels, ((0, 0), (0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    dy, dx = rng.integers(0, 2 * pad + 1, size=(2, b))
    shifted = np.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
    return shifted, np.stack([pad - dx, pad - dy], axis=1)


# Families whose instructions name no direction ("touch the red cube", "push ... onto the green
# pad"): mirroring or transposing the table leaves the instruction true, so their frames can be.
SYMMETRIC_FAMILIES = ("reach", "push_to_pad")


def table_symmetry(pixels: np.ndarray, state: np.ndarray, actions: np.ndarray, where: np.ndarray | None,
                   which: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Augmentation: row i seen under the table's symmetry `which[i]` in 0..7 (an element of the
    square's dihedral group): bit 2 swaps world x and y, then bit 0 negates x and bit 1 negates y.
    The top camera looks straight down on the table's centre, so the image transforms exactly with
    the world. pixels [B, V, H, W, 3] (square, top view), state [B, 4] (x, y, vx, vy), actions
    [B, K, 2] (vx, vy), where [B, P, 2] as image (u, v) with u along +x and v along -y."""
    pixels, state, actions = pixels.copy(), state.copy(), actions.copy()
    where = None if where is None else where.copy()
    for i, g in enumerate(which):
        if g & 4:  # (x, y) -> (y, x): the image's anti-transpose, (u, v) -> (-v, -u)
            pixels[i] = pixels[i, :, ::-1, ::-1].transpose(0, 2, 1, 3)
            state[i] = state[i, [1, 0, 3, 2]]
            actions[i] = actions[i, :, ::-1]
            if where is not None:
                where[i] = -where[i, :, ::-1]
        if g & 1:  # x -> -x: columns reversed, u -> -u
            pixels[i] = pixels[i, :, :, ::-1]
            state[i, [0, 2]] *= -1
            actions[i, :, 0] *= -1
            if where is not None:
                where[i, :, 0] *= -1
        if g & 2:  # y -> -y: rows reversed, v -> -v
            pixels[i] = pixels[i, :, ::-1]
            state[i, [1, 3]] *= -1
            actions[i, :, 1] *= -1
            if where is not None:
                where[i, :, 1] *= -1
    return pixels, state, actions, where


def tabletop_truth(ds: EpisodeDataset, i: int, option: str) -> tuple[np.ndarray, ...]:
    """Episode i's recorded privileged truth (object_pos, pad_pos, pusher_pos) for every frame, the
    input of `envs.experts.replay_infos`; `option` names the setting that needs it, for the error."""
    keys = ("object_pos", "pad_pos", "pusher_pos")
    missing = [k for k in keys if f"privileged/{k}" not in ds.frames]
    if missing or ds.meta.env_id != TABLETOP_ID:
        why = f"lacks the privileged truth {missing}" if missing else f"is a {ds.meta.env_id} dataset"
        raise ValueError(f"{option} reads the tabletop's privileged truth, but {ds.path} {why}; turn it off for "
                         f"this dataset")
    lo, n = int(ds.starts[i]), int(ds.lengths[i])
    return tuple(np.asarray(ds.frames[f"privileged/{k}"][lo:lo + n + 1]) for k in keys)


def first_of_each_family(ds: EpisodeDataset, episodes: np.ndarray, budget: dict[str, int]) -> np.ndarray:
    """The first budget[family] of `episodes` of each family named in `budget` (the others: none)."""
    family = np.array([ds.task(i)["family"] for i in episodes])
    unknown = set(budget) - set(family)
    if unknown:
        raise ValueError(f"target.family_episodes names {sorted(unknown)}, but {ds.path} has episodes of "
                         f"{sorted(set(family))} only")
    return np.sort(np.concatenate([episodes[family == f][:int(n)] for f, n in budget.items()]))


def relabel_with_expert(ds: EpisodeDataset, episodes: np.ndarray) -> None:
    """Replace, in memory, the recorded actions of `episodes` by the clean scripted expert's action
    at each recorded state (`envs.experts.expert_labels`). On noisy-expert episodes this is DART:
    the states a fallible demonstrator drifted into, labelled with how to recover."""
    for i in episodes:
        lo, n = int(ds.starts[i]), int(ds.lengths[i])
        ds.frames["action"][lo:lo + n] = expert_labels(ds.task(i), *tabletop_truth(ds, i, "target.labels=expert"))[:n]


def named_point_targets(ds: EpisodeDataset, episodes: np.ndarray) -> np.ndarray:
    """Per frame [N, N_NAMED_POINTS, 2]: where the pusher and the things the instruction names
    (`envs.experts.named_points`) appear in the first camera's image, as (u, v) in [-1, 1]; NaN
    where unseen or outside `episodes`."""
    out = np.full((len(ds.frames["state"]), N_NAMED_POINTS, 2), np.nan, np.float32)
    camera = ds.meta.cameras[0]
    for i in episodes:
        lo, n = int(ds.starts[i]), int(ds.lengths[i])
        infos = replay_infos(ds.task(i), *tabletop_truth(ds, i, "target.model.where_weight > 0"))
        out[lo:lo + n + 1] = image_coords(np.stack([named_points(info) for info in infos]), camera)
    return out


class VLATarget:
    """The VLA, by conditional flow matching on the chunks of successful episodes of the chosen
    policies (default: the clean expert); with `model.aux_weight` > 0 also the VLA-JEPA auxiliary,
    whose targets are the frozen world model's latents of the frames after each future chunk."""

    def __init__(self, cfg: DictConfig):
        t = cfg.target
        self.cfg = cfg
        self.train_ds, self.eval_ds = open_dataset(cfg.data), open_dataset(cfg.eval_data)
        _, views, height, _, _ = self.train_ds.frames["pixels"].shape
        if t.get("blank_names") and self.train_ds.meta.env_id != TABLETOP_ID:
            raise ValueError(f"target.blank_names blanks the tabletop's colours and shapes, but {self.train_ds.path} "
                             f"is a {self.train_ds.meta.env_id} dataset: set target.blank_names=false")
        names = tuple(COLOURS) + tuple(SHAPES) if t.get("blank_names") else ()
        self.model_cfg = VLAConfig(**t.model, image_size=height, cameras=views, blank_words=names,
                                   state_dim=self.train_ds.frames["state"].shape[1],
                                   action_dim=self.train_ds.frames["action"].shape[1])
        self.model = _build(cfg.seed, lambda: VLA(self.model_cfg))
        self.model.set_normalization(self.train_ds.stats)
        self.objective, self.modules = self.model, {"vla": self.model}
        self.world_model = WorldModel.load(cfg.world_model) if self.model_cfg.aux_weight > 0 else None
        horizon = self.model_cfg.aux_horizon if self.world_model is not None else 1
        labels = t.get("labels", "recorded")
        if labels not in ("recorded", "expert"):
            raise ValueError(f"target.labels must be recorded or expert, got {labels!r}")
        self.samplers, self.langs, self.tokens, self.head_langs, self.where = [], [], [], [], []
        for ds in (self.train_ds, self.eval_ds):
            relabel = labels == "expert"  # held-out episodes too, so the held-out loss measures the same labels
            policies = list(t.policies if ds is self.train_ds else t.eval_policies)
            behaviour = np.array([p.split("(")[0] for p in ds.policies])
            usable = np.ones(len(ds), bool) if relabel else ds.success  # relabelled failures still teach
            # The recipe's budget: the first `episodes` of each policy's (training only), or with
            # family_episodes the first n of each family's.
            if ds is self.train_ds and t.get("family_episodes"):
                keep = first_of_each_family(ds, np.flatnonzero(np.isin(behaviour, policies) & usable),
                                            dict(t.family_episodes))
            else:
                cap = int(t.episodes) if ds is self.train_ds and t.get("episodes") else None
                keep = np.sort(np.concatenate([np.flatnonzero((behaviour == p) & usable)[:cap] for p in policies]))
            if len(keep) == 0:
                raise ValueError(f"{ds.path} has no {'' if relabel else 'successful '}episodes of policies {policies}")
            if relabel:
                relabel_with_expert(ds, keep)
            if self.model_cfg.where_weight > 0:
                # With where_frames the "where" auxiliary also sees frames of every training episode.
                located = np.arange(len(ds)) if ds is self.train_ds and t.get("where_frames") else keep
                self.where.append(named_point_targets(ds, located))
            self.samplers.append(WindowSampler(ds, history=1, horizon=horizon, chunk=self.model_cfg.chunk,
                                               episodes=keep, pad_end=bool(t.get("pad_end", False))))
            self.langs.append(instruction_table(ds)[0])
            if self.model_cfg.token_points:
                self.tokens.append(instruction_tokens(ds))
            if names:
                self.head_langs.append(instruction_table(ds, names)[0])
        self.symmetric = None
        if t.get("symmetry"):
            if self.train_ds.meta.env_id != TABLETOP_ID or list(self.train_ds.meta.cameras) != ["top"] \
                    or height != self.train_ds.frames["pixels"].shape[3]:
                raise ValueError(f"target.symmetry needs a tabletop dataset seen by the top camera alone, in "
                                 f"square images; {self.train_ds.path} has cameras "
                                 f"{list(self.train_ds.meta.cameras)} at {height}x"
                                 f"{self.train_ds.frames['pixels'].shape[3]}: turn it off for this dataset")
            self.symmetric = np.array([self.train_ds.task(i)["family"] in SYMMETRIC_FAMILIES
                                       for i in range(len(self.train_ds))])
        self.perception_batch = t.get("perception_batch")
        if self.perception_batch is not None:
            m = self.model_cfg
            if not (m.true_points and m.keypoints == 0 and not m.coarse and not t.get("where_frames")
                    and not t.get("symmetry") and 1 <= self.perception_batch <= t.batch):
                raise ValueError(f"target.perception_batch={self.perception_batch} (the frames of a step's "
                                 f"{t.batch} the CNN sees) must lie in 1..target.batch, and needs a policy that "
                                 f"reads no pixels in training (model.true_points=true, model.keypoints=0, "
                                 f"model.coarse=false) and neither target.where_frames nor target.symmetry; "
                                 f"or set it to null")
        if t.get("where_frames"):
            self.perception_sampler = WindowSampler(self.train_ds, history=1, horizon=1, chunk=self.model_cfg.chunk,
                                                    pad_end=True)
        self.eval_batch = self._batch(1, np.random.default_rng(0), t.eval_windows)

    def _batch(self, split: int, rng: np.random.Generator, size: int) -> dict[str, torch.Tensor]:
        # With perception_batch, only the first windows' pixels (in proportion on each of several processes).
        seen = size if split == 1 or self.perception_batch is None else \
            max(1, round(self.perception_batch * size / self.cfg.target.batch))
        w, out = self._windows(self.samplers[split], split, rng, size, demonstrations=True, seen=seen)
        if self.world_model is not None:
            out["future_latents"] = self.world_model.encode_target(torch.from_numpy(w.future_pixels),
                                                                   torch.from_numpy(w.future_state))
        if split == 0 and self.where and self.cfg.target.get("where_frames"):
            # Perception-only rows: frames of any episode (any policy), NaN actions, "where" targets.
            _, extra = self._windows(self.perception_sampler, 0, rng, int(self.cfg.target.where_frames), False)
            if "future_latents" in out:
                latents = out["future_latents"]
                extra["future_latents"] = latents.new_full((len(extra["pixels"]), *latents.shape[1:]), float("nan"))
            out = {k: torch.cat([out[k], extra[k]]) for k in out}
        return out

    def _windows(self, sampler: WindowSampler, split: int, rng: np.random.Generator, size: int,
                 demonstrations: bool, seen: int | None = None):
        """`size` windows of `sampler` as model inputs (NaN actions unless `demonstrations`), the
        pixels of only the first `seen` (default: all)."""
        w = sampler.sample(rng, size)
        seen = size if seen is None else seen
        pixels, state, actions, moved = w.pixels[:seen, -1], w.state[:, -1], w.actions[:, 0], np.zeros((size, 2))
        where = self.where[split][sampler.ds.starts[w.episode] + w.t] if self.where else None
        if split == 0 and self.symmetric is not None:
            which = np.where(self.symmetric[w.episode], rng.integers(0, 8, size=len(w.t)), 0)
            pixels, state, actions, where = table_symmetry(pixels, state, actions, where, which)
        if split == 0 and self.cfg.target.get("shift"):
            pad = int(self.cfg.target.shift)
            pixels, moved[:seen] = random_shift(pixels, pad, rng)
            moved[seen:] = rng.integers(-pad, pad + 1, size=(size - seen, 2))  # unseen rows' points move alike
        actions = torch.from_numpy(actions)
        out = {"pixels": torch.from_numpy(pixels), "state": torch.from_numpy(state),
               "lang": self.langs[split][torch.from_numpy(w.episode)],
               "actions": actions if demonstrations else torch.full_like(actions, float("nan")),
               "action_pad": torch.from_numpy(w.action_pad[:, :self.model_cfg.chunk])}
        if self.tokens:
            out["lang_tokens"] = self.tokens[split][torch.from_numpy(w.episode)]
        if self.head_langs:
            out["head_lang"] = self.head_langs[split][torch.from_numpy(w.episode)]
        if where is not None:
            moved = 2 * moved / np.array([pixels.shape[3], pixels.shape[2]])  # pixels -> image coordinates
            out["where"] = torch.from_numpy(where + moved[:, None]).float()  # the targets follow the shift
        return w, out

    def batch(self, rng: np.random.Generator, size: int) -> dict[str, torch.Tensor]:
        return self._batch(0, rng, size)

    def after_step(self) -> None:
        pass

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out flow loss, and how far a sampled chunk lies from the expert's (mean |Δa| over the
        actions inside the episode)."""
        b = self.eval_batch
        losses = self.model(**b, generator=torch.Generator().manual_seed(0))
        sampled = self.model.sample_chunks(b, 1, torch.Generator().manual_seed(0))[:, 0]
        return {**{k: float(v) for k, v in losses.items()},
                "chunk_abs_error": float((sampled - b["actions"]).abs()[~b["action_pad"]].mean())}

    def config(self) -> dict:
        return {"kind": "vla", "model": self.model_cfg.to_dict(), "train": OmegaConf.to_container(self.cfg.target),
                "data": str(self.cfg.data), "seed": self.cfg.seed}
