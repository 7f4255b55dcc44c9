"""Turning an `env` config group into an environment."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

import envs


def env_from_config(cfg: DictConfig, **overrides):
    """The environment an `env/*.yaml` config describes, with its perturbations applied."""
    kwargs = OmegaConf.to_container(cfg, resolve=True)
    env_id = kwargs.pop("id")
    perturbations = kwargs.pop("perturbations", None) or {}
    kwargs.update(overrides)
    return envs.make_env(env_id, perturbations=perturbations, **kwargs)
