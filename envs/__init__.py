"""Environments: the MuJoCo tabletop suite, its tasks, scripted experts and perturbations.

Importing this package registers `foresight/Tabletop-v0` with gymnasium. It never imports torch.
"""

import os

# Headless rendering by default; must be set before mujoco is imported.
os.environ.setdefault("MUJOCO_GL", "egl")
# Software GL (llvmpipe) rasterises small frames fastest on the calling thread: its worker
# threads cost more than they save at 64x64 (measured: 765 vs 610 steps/s).
os.environ.setdefault("LP_NUM_THREADS", "0")

import gymnasium as gym  # noqa: E402

from .experts import ScriptedExpert  # noqa: E402
from .metaworld import METAWORLD_TASKS, metaworld_id, register_metaworld  # noqa: E402
from .perturbations import AXES, apply_perturbations  # noqa: E402
from .tabletop import TabletopEnv  # noqa: E402
from .tasks import FAMILIES, REGIONS, TaskSpec  # noqa: E402

TABLETOP_ID = "foresight/Tabletop-v0"
if TABLETOP_ID not in gym.registry:
    gym.register(TABLETOP_ID, entry_point="envs.tabletop:TabletopEnv")
register_metaworld()  # foresight/MetaWorld-<task>-v0; metaworld itself loads on first make

# Evaluation episodes start from seeds at or above this; data collection stays below it, so
# no evaluation start state was ever seen in training.
EVAL_SEED_START = 1_000_000


def make_env(id: str = TABLETOP_ID, perturbations: dict[str, float] | None = None,
             seed: int | None = None, **kwargs) -> gym.Env:
    """`gym.make(id, **kwargs)` wrapped in the perturbation axes of `perturbations` ({axis: strength})."""
    env = gym.make(id, disable_env_checker=True, **kwargs)
    return apply_perturbations(env, perturbations or {}, seed=seed)


__all__ = ["TabletopEnv", "TaskSpec", "ScriptedExpert", "FAMILIES", "REGIONS", "AXES",
           "TABLETOP_ID", "EVAL_SEED_START", "METAWORLD_TASKS", "apply_perturbations", "make_env",
           "metaworld_id"]
