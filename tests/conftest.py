"""Shared fixtures: a small real dataset (MuJoCo episodes at 32x32) for the training tests."""

import numpy as np
import pytest

import envs
from envs.dataset import EpisodeWriter, dataset_meta, record_episode
from envs.experts import RandomPlay


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """10 episodes (expert and random play, two families) of foresight/Tabletop-v0 at 32x32."""
    path = tmp_path_factory.mktemp("data") / "tiny.h5"
    env = envs.make_env(image_size=32)
    with EpisodeWriter(path, dataset_meta(env, {"image_size": 32}), env.unwrapped.privileged_shapes) as writer:
        for seed in range(10):
            rng = np.random.default_rng(seed)
            policy = env.unwrapped.make_expert(0.1, rng) if seed % 2 else RandomPlay(2, rng)
            family = ("push_to_pad", "push_to_region")[seed % 4 // 2]
            writer.append(record_episode(env, policy, seed, "mixed", options={"task": family}))
    env.close()
    return path


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Small random-init world model, goal model and VLA for 32x32 frames, saved as `make train`
    saves them (checkpoints/<name>/), for the entry points that load checkpoints."""
    import torch

    from models.checkpoint import save_checkpoint
    from models.goal import GoalModel, GoalModelConfig
    from models.vla import VLA, VLAConfig
    from models.world_model import WorldModel, WorldModelConfig

    root = tmp_path_factory.mktemp("checkpoints")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        models = {"world_model": WorldModel(WorldModelConfig(image_size=32, latent_dim=16, width=32, blocks=1,
                                                             cond_dim=16, keypoints=4)),
                  "goal": GoalModel(GoalModelConfig(latent_dim=16, width=32, critic_dim=8)),
                  "vla": VLA(VLAConfig(image_size=32, backbone="cnn", width=32, expert_width=32, expert_blocks=1,
                                       flow_steps=2, keypoints=4))}
    for name, model in models.items():
        save_checkpoint(root / name, {name: model}, {"kind": name, "model": model.cfg.to_dict()})
    return root
