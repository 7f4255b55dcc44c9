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
