"""`foresight-collect`: record episodes into a dataset, in parallel, resumably.

    foresight-collect env=tabletop episodes=500 policy=mixture out=data/tabletop.h5
    foresight-collect env=tabletop episodes=200 policy=expert noise=0.3 out=data/noisy.h5
    foresight-collect episodes=4500 seed=0 policy=dagger out=data/tabletop.h5   # + 500 VLA episodes

Episodes whose seed a file already holds are skipped, so the last line appends 500 DAgger episodes
(seeds 4000-4499) to a 4,000-episode file.

Episode i starts from seed `seed + i` and its behaviour is drawn from that seed alone, so the
dataset does not depend on the number of workers, and a killed run resumes where it stopped.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from experiments.common import CONFIG_DIR, clean_errors

POLICIES = ("expert", "random", "mixture", "dagger")


class DAggerPolicy:
    """DAgger's data policy (Ross et al., 2011): the VLA acts, or with probability `beta` per step
    the clean expert, so the episodes visit the states the VLA's own mistakes lead to (an object
    pinned at a wall, a pusher on the wrong side). `foresight-train target=vla target.labels=expert`
    then relabels them with the expert's action, which is what the VLA must learn to do there."""

    reads_observation = True

    def __init__(self, controller, expert, beta: float, rng: np.random.Generator, seed: int):
        self.controller, self.expert, self.beta, self.rng, self.seed = controller, expert, beta, rng, seed

    def reset(self, instruction: str) -> None:
        self.controller.reset(instruction, seed=self.seed)

    def act(self, info: dict, obs: dict) -> np.ndarray:
        action = self.controller.act(obs)  # every step, so its action queue stays in step with the env
        if self.beta > 0 and self.rng.uniform() < self.beta:
            action = np.clip(self.expert.clean_action(info), -1.0, 1.0).astype(np.float32)
        return action


def choose_behaviour(cfg: dict, seed: int) -> tuple[str, float]:
    """(behaviour name, expert noise) of the episode started from `seed`."""
    if cfg["policy"] == "expert":
        return ("expert" if cfg["noise"] == 0 else "noisy_expert"), float(cfg["noise"])
    if cfg["policy"] in ("random", "dagger"):
        return cfg["policy"], 0.0
    names = sorted(cfg["mixture"])
    shares = np.array([cfg["mixture"][n] for n in names], float)
    name = names[np.random.default_rng([seed, 1]).choice(len(names), p=shares / shares.sum())]
    return name, float(cfg["mixture_noise"]) if name == "noisy_expert" else 0.0


def _worker(env_cfg: dict, cfg: dict, seeds, results) -> None:
    """Record the episodes of the seeds it is handed until it gets None."""
    from envs.dataset import record_episode
    from envs.experts import RandomPlay
    from experiments.env_config import env_from_config

    env = env_from_config(OmegaConf.create(env_cfg))
    controller = _vla_controller(cfg["dagger"]) if cfg["policy"] == "dagger" else None
    try:
        for seed in iter(seeds.get, None):
            behaviour, noise = choose_behaviour(cfg, seed)
            rng = np.random.default_rng([seed, 2])
            if behaviour == "random":
                policy = RandomPlay(env.action_space.shape[0], rng)
            elif behaviour == "dagger":
                policy = DAggerPolicy(controller, env.unwrapped.make_expert(), cfg["dagger"]["beta"], rng, seed)
            else:
                policy = env.unwrapped.make_expert(noise, rng)
            name = behaviour if behaviour != "noisy_expert" else f"noisy_expert({noise:g})"
            results.put(record_episode(env, policy, seed, name))
    except Exception as err:  # tell the parent instead of dying silently
        results.put(err)
    finally:
        env.close()


def _vla_controller(dagger: dict):
    """The VLA alone (planner mode vla), one torch thread per worker."""
    import torch

    from models.vla import VLA
    from planner import ForesightController, PlannerConfig

    torch.set_num_threads(1)
    return ForesightController(PlannerConfig(mode="vla", n_exec=dagger["n_exec"]), vla=VLA.load(dagger["vla"]))


@hydra.main(config_path=CONFIG_DIR, config_name="collect", version_base="1.3")
@clean_errors
def main(cfg: DictConfig) -> None:
    import envs
    from envs.dataset import EpisodeWriter, dataset_meta
    from experiments.env_config import env_from_config

    if cfg.policy not in POLICIES:
        raise ValueError(f"unknown policy {cfg.policy!r}; choose one of {', '.join(POLICIES)}")
    if not 0 <= cfg.noise <= 1 or not 0 <= cfg.mixture_noise <= 1:
        raise ValueError("noise and mixture_noise must be in [0, 1]")
    if cfg.policy == "mixture" and (any(v < 0 for v in cfg.mixture.values()) or sum(cfg.mixture.values()) <= 0):
        raise ValueError(f"mixture shares must be >= 0 and not all 0, got {dict(cfg.mixture)}")
    if cfg.seed < 0 or cfg.seed + cfg.episodes > envs.EVAL_SEED_START:
        raise ValueError(f"collection seeds {cfg.seed}..{cfg.seed + cfg.episodes - 1} must stay below "
                         f"{envs.EVAL_SEED_START} (evaluation seeds start there)")
    if cfg.workers < 1:
        raise ValueError(f"workers must be >= 1, got {cfg.workers}")
    if cfg.policy == "dagger":
        if not 0 <= cfg.dagger.beta <= 1:
            raise ValueError(f"dagger.beta (the share of expert steps) must be in [0, 1], got {cfg.dagger.beta}")
        from models.checkpoint import load_checkpoint
        load_checkpoint(cfg.dagger.vla)  # a missing or broken VLA fails here, not in every worker

    env_cfg = OmegaConf.to_container(cfg.env, resolve=True)
    options = {k: v for k, v in env_cfg.items() if k != "id"}
    probe = env_from_config(cfg.env)  # for the metadata; workers make their own
    meta = dataset_meta(probe, options)
    shapes = getattr(probe.unwrapped, "privileged_shapes", {})
    probe.close()

    writer = EpisodeWriter(Path(cfg.out), meta, shapes)
    wanted = range(cfg.seed, cfg.seed + cfg.episodes)
    todo = [s for s in wanted if s not in writer.done_seeds()]
    plain = OmegaConf.to_container(cfg, resolve=True)
    ctx = mp.get_context("spawn")  # EGL contexts do not survive fork
    seeds, results = ctx.Queue(), ctx.Queue()
    for s in todo:
        seeds.put(s)
    n_workers = min(cfg.workers, max(len(todo), 1))
    for _ in range(n_workers):
        seeds.put(None)
    procs = [ctx.Process(target=_worker, args=(env_cfg, plain, seeds, results), daemon=True)
             for _ in range(n_workers if todo else 0)]
    for p in procs:
        p.start()
    successes, finished = 0, False
    try:
        with tqdm(total=cfg.episodes, initial=cfg.episodes - len(todo), desc="collect", unit="ep") as bar:
            for _ in todo:
                item = results.get()
                if isinstance(item, Exception):
                    raise RuntimeError(f"a collection worker failed: {item!r}")
                writer.append(item)
                successes += item.success
                bar.update()
        finished = True
    finally:
        for p in procs:
            if not finished:
                p.terminate()
            p.join()
        writer.close()  # what was appended stays, with statistics; a rerun resumes
    print(f"{cfg.out}: {cfg.episodes} episodes ({len(todo)} new, {successes} of them successful)")


if __name__ == "__main__":
    main()
