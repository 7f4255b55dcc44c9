"""`foresight-experts`: how well the scripted experts solve each task family.

    foresight-experts                       # 200 fresh-seed episodes per family, a table
    foresight-experts episodes=1 video=true # one captioned video per family (the demo)
    foresight-experts noise=0.3 env.perturbations.lighting=0.5

Writes `results.json` (and `videos/<family>.mp4`) into the run directory.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import envs
from experiments.common import (CONFIG_DIR, captioned, clean_errors, format_table, success_cells,
                                success_summary, write_json, write_video, wrap_text)
from experiments.env_config import env_from_config


def run_episode(env, expert, seed: int, family: str | None, record: bool):
    """One expert episode (of task `family`, where the env has several); returns (success, steps, frames)."""
    _, info = env.reset(seed=seed, options={"task": family} if family else None)
    expert.reset()
    frames = [_frame(env, info, 0, False)] if record else []
    steps, done, success = 0, False, False
    while not done:
        _, _, success, truncated, info = env.step(expert.act(info))
        steps += 1
        done = success or truncated
        if record:
            frames.append(_frame(env, info, steps, success))
    return bool(success), steps, frames


def _frame(env, info, step, success):
    lines = wrap_text(info["instruction"], 44)[:3]
    lines.append(f"step {step}/{info['task']['budget']}" + ("   success" if success else ""))
    return captioned(env.render(), lines, height=70)


@hydra.main(config_path=CONFIG_DIR, config_name="experts", version_base="1.3")
@clean_errors
def main(cfg: DictConfig) -> None:
    out = Path(cfg.out)
    first_seed = envs.EVAL_SEED_START if cfg.seed is None else int(cfg.seed)
    env = env_from_config(cfg.env, render_mode="rgb_array" if cfg.video else None,
                          render_size=int(cfg.video_size))
    expert = env.unwrapped.make_expert(float(cfg.noise), np.random.default_rng(first_seed))
    families = list(cfg.env.tasks) if "tasks" in cfg.env else [None]  # Meta-World: one task per env
    results = {}
    with tqdm(total=len(families) * cfg.episodes, desc="expert episodes", unit="ep") as bar:
        for family in families:
            label = family or env.unwrapped.task  # a Meta-World env is named by its one task
            outcomes = []
            for ep in range(cfg.episodes):
                record = cfg.video and ep < cfg.video_episodes
                success, steps, frames = run_episode(env, expert, first_seed + ep, family, record)
                outcomes.append((success, steps))
                budget = env.unwrapped.task.budget if family else env.unwrapped.max_steps
                if record:
                    name = label if cfg.video_episodes == 1 else f"{label}_{ep}"
                    path = write_video(out / "videos" / f"{name}.mp4", frames, fps=envs.tabletop.CONTROL_HZ)
                    tqdm.write(f"video: {path}")
                bar.update()
            results[label] = {**success_summary([s for s, _ in outcomes], [n for _, n in outcomes]),
                              "budget": budget}
    env.close()
    rows = [(f, *success_cells(r), f"{r['mean_steps']:.1f}", r["budget"])
            for f, r in results.items()]
    print(format_table(["task", "successes", "rate", "95% CI", "mean steps", "budget"], rows))
    write_json(out / "results.json", {"config": OmegaConf.to_container(cfg.env, resolve=True),
                                      "noise": cfg.noise, "first_seed": first_seed, "results": results})
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
