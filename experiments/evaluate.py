"""`foresight-evaluate`: what the trained world model and goal model show on held-out episodes.

    foresight-evaluate                       # checkpoints/tabletop/{world_model,goal}, data/tabletop_eval.h5

1. Open-loop latent rollout error per horizon (1..max_horizon chunks) against copying the last
   latent, on windows of held-out episodes.
2. A linear probe (ridge regression, fitted on training episodes) from a latent to the planar
   position of the object of each colour; its error on held-out frames, and on imagined latents
   per horizon (the same probe applied to the rollout, against where the objects really were).
   The same probe for the target pads, beside the error of guessing each pad's mean position: a
   goal on the latent can only put an object on a pad the latent locates.
3. Goal retrieval: is G(ℓ, z_0) nearer its own episode's final latent than those of episodes with
   other instructions; and the language critic's accuracy.

Prints a table and writes results.json to the run directory.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from experiments.common import CONFIG_DIR, clean_errors, format_table, write_json


class PositionProbe:
    """Ridge regression from a latent to the xy of the object (or pad) of each colour (where present)."""

    def __init__(self, alpha: float = 1e-2):
        self.alpha, self.weights, self.means = alpha, {}, {}

    def fit(self, z: np.ndarray, xy: np.ndarray) -> "PositionProbe":
        """z [N, D]; xy [N, C, 2] with NaN where colour c is absent."""
        x = _with_bias(z)
        for c in range(xy.shape[1]):
            rows = ~np.isnan(xy[:, c, 0])
            if rows.sum() > x.shape[1]:
                a = x[rows].T @ x[rows] + self.alpha * len(x[rows]) * np.eye(x.shape[1])
                self.weights[c] = np.linalg.solve(a, x[rows].T @ xy[rows, c])
                self.means[c] = xy[rows, c].mean(0)
        return self

    def errors(self, z: np.ndarray, xy: np.ndarray) -> np.ndarray:
        """Euclidean errors (metres) over every present (frame, colour) the probe was fitted for."""
        x = _with_bias(z)
        out = [np.linalg.norm(x[rows] @ w - xy[rows, c], axis=1)
               for c, w in self.weights.items() for rows in [~np.isnan(xy[:, c, 0])]]
        return np.concatenate(out) if out else np.zeros(0)

    def mean_errors(self, xy: np.ndarray) -> np.ndarray:
        """The baseline: errors of guessing each colour's mean training position, as `errors` counts them."""
        out = [np.linalg.norm(xy[rows, c] - m, axis=1) for c, m in self.means.items() for rows in [~np.isnan(xy[:, c, 0])]]
        return np.concatenate(out) if out else np.zeros(0)


def _with_bias(z: np.ndarray) -> np.ndarray:
    return np.concatenate([z, np.ones((len(z), 1))], axis=1).astype(np.float64)


def colour_positions(ds, frames: np.ndarray, episodes: np.ndarray, what: str = "objects") -> np.ndarray:
    """xy of each colour's object (what="objects") or target pad ("pads") [N, C, 2] (NaN when
    absent) at dataset frame indices `frames`."""
    from envs.scene import COLOURS

    colours = list(COLOURS)
    pos = ds.frames[f"privileged/{'object' if what == 'objects' else 'pad'}_pos"][frames]  # loaded: numpy indexing
    out = np.full((len(frames), len(colours), 2), np.nan)
    for e in np.unique(episodes):
        rows = episodes == e
        for slot, name in enumerate(ds.task(int(e))[what]):
            out[rows, colours.index(name.split()[0])] = pos[rows, slot, :2]
    return out


def frames_of(ds, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n random (frame index, episode) pairs of a dataset."""
    episodes = rng.integers(len(ds), size=n)
    t = (rng.random(n) * (ds.lengths[episodes] + 1)).astype(np.int64)
    return ds.starts[episodes] + t, episodes


def fit_probes(model, train_ds, eval_ds, rng: np.random.Generator, frames: int, alpha: float,
               kinds: tuple[str, ...] = ("objects",)) -> dict[str, tuple[PositionProbe, np.ndarray, np.ndarray]]:
    """Per kind ("objects", "pads"): the probe fitted on the latents of `frames` random training
    frames, its errors (metres) on as many random held-out frames, and there the errors of guessing
    the mean position. The frames are drawn and encoded once for every kind."""
    from experiments.targets import encode_frames

    train_frames, train_eps = frames_of(train_ds, rng, frames)
    z_train = encode_frames(model, train_ds, train_frames).numpy()
    eval_frames, eval_eps = frames_of(eval_ds, rng, frames)
    z_eval = encode_frames(model, eval_ds, eval_frames).numpy()
    out = {}
    for kind in kinds:
        probe = PositionProbe(alpha).fit(z_train, colour_positions(train_ds, train_frames, train_eps, kind))
        truth = colour_positions(eval_ds, eval_frames, eval_eps, kind)
        out[kind] = probe, probe.errors(z_eval, truth), probe.mean_errors(truth)
    return out


def imagined_probe_errors(probe: PositionProbe, ds, windows, imagined: torch.Tensor, chunk: int) -> list[np.ndarray]:
    """Per horizon j: the probe's errors on imagined latents [B, H, D] of `windows` against where the
    objects really were j + 1 chunks after each window's present."""
    now = ds.starts[windows.episode] + windows.t
    return [probe.errors(imagined[:, j].numpy(), colour_positions(ds, now + (j + 1) * chunk, windows.episode))
            for j in range(imagined.shape[1])]


def evaluate(cfg: DictConfig) -> dict:
    from envs.dataset import WindowSampler
    from envs.scene import TABLE_HALF
    from experiments.targets import (EncodedEpisodes, goal_metrics, instruction_table, open_dataset,
                                     rollout_errors, window_tensors)
    from models import WorldModel
    from models.goal import GoalModel

    torch.set_num_threads(cfg.threads)
    model = WorldModel.load(cfg.world_model)
    train_ds, eval_ds = open_dataset(cfg.data), open_dataset(cfg.eval_data)
    rng = np.random.default_rng(cfg.seed)
    k, h = model.cfg.chunk, model.cfg.history
    results: dict = {"world_model": str(cfg.world_model), "eval_data": str(cfg.eval_data)}

    # 1. Rollout error per horizon.
    sampler = WindowSampler(eval_ds, history=h, horizon=cfg.max_horizon, chunk=k, stride=k)
    windows = sampler.sample(rng, cfg.windows)
    lang, _ = instruction_table(eval_ds)
    model_err, copy_err, imagined = rollout_errors(model, window_tensors(windows, lang))
    results["rollout"] = [{"horizon": i + 1, "model": m, "copy_last": c, "ratio": m / c}
                          for i, (m, c) in enumerate(zip(model_err, copy_err))]

    # 2. Linear probe on real latents, then on imagined ones.
    probes = fit_probes(model, train_ds, eval_ds, rng, cfg.probe_frames, cfg.probe_alpha, kinds=("objects", "pads"))
    probe, err, guess = probes["objects"]
    width = 2 * TABLE_HALF
    results["probe"] = {"mean_error_m": float(err.mean()), "mean_error_of_table_width": float(err.mean() / width),
                        "table_width_m": width, "mean_position_error_m": float(guess.mean())}
    per_horizon = [{"horizon": j + 1, "mean_error_m": float(e.mean()), "mean_error_of_table_width": float(e.mean() / width)}
                   for j, e in enumerate(imagined_probe_errors(probe, eval_ds, windows, imagined, k))]
    results["probe"]["imagined"] = per_horizon
    _, err, guess = probes["pads"]
    if len(err):  # only datasets with pad tasks
        results["probe"]["pads"] = {"mean_error_m": float(err.mean()), "mean_position_error_m": float(guess.mean())}

    # 3. Goal retrieval and the critic.
    if cfg.goal and Path(cfg.goal).exists():
        goal = GoalModel.load(cfg.goal)
        results["goal"] = goal_metrics(goal, EncodedEpisodes(model, eval_ds, only_successful=goal.value_net is None))
    return results


def report(results: dict) -> str:
    rows = [[r["horizon"], f"{r['model']:.4f}", f"{r['copy_last']:.4f}", f"{r['ratio']:.2f}",
             f"{100 * p['mean_error_of_table_width']:.1f}%"]
            for r, p in zip(results["rollout"], results["probe"]["imagined"])]
    lines = ["open-loop latent error on held-out episodes (and the probe on the imagined latents):",
             format_table(["horizon (chunks)", "model MSE", "copy-last MSE", "ratio", "probe error / table width"], rows),
             f"linear probe on encoded frames: {100 * results['probe']['mean_error_m']:.2f} cm = "
             f"{100 * results['probe']['mean_error_of_table_width']:.1f}% of the table width (guessing each "
             f"colour's mean position: {100 * results['probe']['mean_position_error_m']:.2f} cm)"]
    if "pads" in results["probe"]:
        pads = results["probe"]["pads"]
        lines.append(f"the same probe for the target pads: {100 * pads['mean_error_m']:.2f} cm (guessing the mean: "
                     f"{100 * pads['mean_position_error_m']:.2f} cm)")
    if "goal" in results:
        g = results["goal"]
        lines.append(f"goal retrieval: pairwise {100 * g['retrieval_pairwise']:.1f}% (z_0 as the goal: "
                     f"{100 * g['retrieval_pairwise_copy_z0']:.1f}%), top-1 {100 * g['retrieval_top1']:.1f}%, "
                     f"over {g['episodes']:.0f} successful episodes; critic picks the instruction "
                     f"{100 * g['critic_instruction_top1']:.1f}%, final above first {100 * g['critic_final_above_first']:.1f}%")
    return "\n".join(lines)


@hydra.main(config_path=CONFIG_DIR, config_name="evaluate", version_base="1.3")
@clean_errors
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    results = evaluate(cfg)
    print(report(results))
    path = write_json(Path(HydraConfig.get().runtime.output_dir) / "results.json", results)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
