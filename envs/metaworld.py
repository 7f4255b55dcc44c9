"""`foresight/MetaWorld-<task>-v0`: one Meta-World (v3) task behind our tabletop env's interface.

`<task>` is Meta-World's own v3 name, verbatim, and `-v0` is our wrapper's version:
`foresight/MetaWorld-reach-v3-v0`, `foresight/MetaWorld-door-open-v3-v0`, ... (`metaworld_id`).
Every reset draws a new variation of the task (object and goal positions) from the reset seed,
so the same seed gives the same scene, instruction and frames. The instructions are our own
paraphrases, split into train and held-out sets like `envs.tasks.TEMPLATES`.

`metaworld` is imported only when an env or expert is built, so `import envs` stays fast.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import gymnasium as gym
import mujoco
import numpy as np
from gymnasium import spaces

from .scene import Renderer
from .tabletop import parse_image_size
from .tasks import (CHARSET, INSTRUCTION_SPLITS, MAX_INSTRUCTION_LENGTH, check_instruction,
                    validate_choice)

# Our paraphrases per task (the MT10 set). Held-out ones are never used for training.
INSTRUCTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "reach-v3": {
        "train": ("reach the goal", "move the gripper to the target", "put the hand on the marked spot",
                  "reach for the target point", "bring the gripper to the goal position"),
        "heldout": ("position the end effector at the target marker", "go to the target location"),
    },
    "push-v3": {
        "train": ("push the puck to the goal", "slide the puck to the target",
                  "push the puck onto the marked spot", "move the puck to the goal by pushing it",
                  "shove the puck over to the target"),
        "heldout": ("nudge the puck along until it reaches the goal",
                    "get the puck to the target without lifting it"),
    },
    "pick-place-v3": {
        "train": ("pick up the puck and place it at the goal", "grasp the puck and put it on the target",
                  "lift the puck and move it to the goal", "pick the puck up and set it down at the target",
                  "carry the puck to the goal"),
        "heldout": ("take the puck and drop it off at the marked point",
                    "grab the puck and bring it to the target position"),
    },
    "door-open-v3": {
        "train": ("open the door", "pull the door open", "swing the door open",
                  "open the door by its handle", "pull on the handle to open the door"),
        "heldout": ("get the door open", "swing the safe door wide open"),
    },
    "drawer-open-v3": {
        "train": ("open the drawer", "pull the drawer open", "slide the drawer out",
                  "pull out the drawer", "open the drawer by its handle"),
        "heldout": ("draw the drawer out toward you", "get the drawer open"),
    },
    "drawer-close-v3": {
        "train": ("close the drawer", "push the drawer shut", "slide the drawer closed",
                  "push the drawer in", "shut the drawer"),
        "heldout": ("push the open drawer back in", "get the drawer closed"),
    },
    "button-press-topdown-v3": {
        "train": ("press the button", "push the button down", "press down on the button from above",
                  "push the button from the top", "press the button down with the gripper"),
        "heldout": ("hit the button from above", "press the button all the way down"),
    },
    "peg-insert-side-v3": {
        "train": ("insert the peg into the hole", "put the peg in the hole",
                  "pick up the peg and slide it into the hole", "push the peg into the hole from the side",
                  "fit the peg into the hole in the box"),
        "heldout": ("grab the peg and insert it sideways into the box", "plug the peg into the hole"),
    },
    "window-open-v3": {
        "train": ("open the window", "slide the window open", "push the window open",
                  "slide the window pane to open it", "open the sliding window"),
        "heldout": ("move the window sash until it is open", "get the window open"),
    },
    "window-close-v3": {
        "train": ("close the window", "slide the window shut", "push the window closed",
                  "slide the window pane closed", "shut the sliding window"),
        "heldout": ("move the window sash until it is shut", "get the window closed"),
    },
}
METAWORLD_TASKS = tuple(INSTRUCTIONS)

# The cameras of Meta-World's scenes; the `corner*` ones are mounted upside down there, and
# we turn their frames upright (see `MetaWorldEnv._render`).
CAMERAS = ("corner", "corner2", "corner3", "corner4", "topview", "behindGripper", "gripperPOV")
RESET_OPTIONS = ("instruction", "instruction_split")
MAX_PATH_LENGTH = 500  # Meta-World's horizon: its step() refuses to go further without a reset
CONTROL_HZ = 80  # 5 physics substeps of 2.5 ms per step
# Step budgets (80 Hz): twice the clean expert's 99th-percentile episode length over 100 seeds,
# rounded up to 50 and capped at Meta-World's 500 (measured p99: 73, 76, 62, 109, 93, 79, 75,
# 280, 95, 88 steps in this order).
BUDGETS = {"reach-v3": 150, "push-v3": 200, "pick-place-v3": 150, "door-open-v3": 250,
           "drawer-open-v3": 200, "drawer-close-v3": 200, "button-press-topdown-v3": 150,
           "peg-insert-side-v3": 500, "window-open-v3": 200, "window-close-v3": 200}
STATE_LOW = np.array([-0.525, 0.348, -0.0525, 0.0], np.float32)  # Meta-World's hand space,
STATE_HIGH = np.array([0.525, 1.025, 0.7, 1.0], np.float32)  # then the gripper opening


def metaworld_id(task: str) -> str:
    """The gym id of one task: `foresight/MetaWorld-<Meta-World v3 name>-v0`."""
    validate_choice("Meta-World task", task, METAWORLD_TASKS)
    return f"foresight/MetaWorld-{task}-v0"


def register_metaworld() -> tuple[str, ...]:
    """Register every task's id with gymnasium (idempotent); imports no Meta-World."""
    ids = tuple(metaworld_id(t) for t in METAWORLD_TASKS)
    for task, env_id in zip(METAWORLD_TASKS, ids):
        if env_id not in gym.registry:
            gym.register(env_id, entry_point="envs.metaworld:MetaWorldEnv", kwargs={"task": task})
    return ids


class MetaWorldEnv(gym.Env):
    """One Meta-World task with pixels, proprioception and a language instruction.

    Action: Meta-World's `Box(-1, 1, (4,))`: the hand's xyz displacement (1 cm per unit) and
    the gripper effort (+1 closes), held for one 80 Hz step.

    Observation (`Dict`):
      pixels       Dict of camera name -> uint8[H, W, 3], upright (table at the bottom)
      state        f32[4]: hand x, y, z (m) and gripper opening in [0, 1]
      instruction  Text: what to do, in English

    `info` holds privileged truth for metrics, probes and the expert only: `is_success`,
    `task` ({"family": task, "budget": max_steps}), `instruction`, `mw_obs` (f32[39],
    Meta-World's goal-observable state vector), `object_pos` f32[3] and `goal_pos` f32[3].

    Reward 1 on success, which ends the episode; truncation after `max_steps` steps (default:
    the task's entry in `BUDGETS`).
    Reset options: `instruction` (replace the text, keep the task), `instruction_split`.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": CONTROL_HZ}

    def __init__(
        self,
        task: str,
        image_size: int | Sequence[int] = 64,
        cameras: Sequence[str] = ("corner",),
        instruction_split: str = "train",
        max_steps: int | None = None,
        render_mode: str | None = None,
        render_size: int = 256,
        render_camera: str = "corner",
    ):
        validate_choice("Meta-World task", task, METAWORLD_TASKS)
        self.task = task
        self.image_hw = parse_image_size(image_size)
        self.cameras = tuple(cameras)
        if not self.cameras:
            raise ValueError(f"cameras is empty; choose from {', '.join(CAMERAS)}")
        for c in self.cameras + (render_camera,):
            validate_choice("camera", c, CAMERAS)
        validate_choice("instruction split", instruction_split, INSTRUCTION_SPLITS)
        self.instruction_split = instruction_split
        max_steps = BUDGETS[task] if max_steps is None else max_steps
        if not isinstance(max_steps, (int, np.integer)) or not 1 <= max_steps <= MAX_PATH_LENGTH:
            raise ValueError(f"max_steps must be an int in [1, {MAX_PATH_LENGTH}] (Meta-World's "
                             f"horizon), got {max_steps!r}")
        self.max_steps = int(max_steps)
        if render_mode is not None:
            validate_choice("render mode", render_mode, self.metadata["render_modes"])
        self.render_mode, self.render_camera = render_mode, render_camera
        self.render_hw = parse_image_size(render_size)

        self._mw = _make_metaworld(task)
        self.model, self.data = self._mw.model, self._mw.data
        # Read when the GL context is made (first render): no shadow map, no multisampling
        # (costly in software GL, and invisible at 64x64); an offscreen buffer big enough.
        vis = self.model.vis
        vis.quality.shadowsize = 0
        vis.quality.offsamples = 0
        # Mirror floors and walls render the whole scene once more per frame (~30% of the
        # time with Meta-World's 68k-triangle robot) for a barely visible effect.
        self.model.mat_reflectance[:] = 0.0
        vis.global_.offheight = max(vis.global_.offheight, self.image_hw[0], self.render_hw[0])
        vis.global_.offwidth = max(vis.global_.offwidth, self.image_hw[1], self.render_hw[1])
        self.camera_ids = {c: self.model.camera(c).id for c in CAMERAS}
        self.renderer: Renderer | None = None  # created on first use: a GL context per env

        h, w = self.image_hw
        self.action_space = spaces.Box(-1.0, 1.0, shape=(4,), dtype=np.float32)
        self.observation_space = spaces.Dict({
            "pixels": spaces.Dict({c: spaces.Box(0, 255, (h, w, 3), np.uint8) for c in self.cameras}),
            "state": spaces.Box(STATE_LOW, STATE_HIGH),
            "instruction": spaces.Text(MAX_INSTRUCTION_LENGTH, min_length=1, charset=CHARSET),
        })
        self.instruction = ""
        self.steps = 0
        self._mw_obs: np.ndarray | None = None
        self._success = False

    # Privileged arrays a dataset records per frame.
    privileged_shapes = {"mw_obs": (39,)}

    def make_expert(self, noise: float = 0.0, rng: np.random.Generator | None = None) -> "MetaWorldExpert":
        """Meta-World's scripted policy for this task (data collection and reference numbers)."""
        return MetaWorldExpert(self.task, noise, rng)

    # ----------------------------------------------------------------------------- gym API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = dict(options or {})
        unknown = set(options) - set(RESET_OPTIONS)
        if unknown:
            raise ValueError(f"unknown reset option(s) {sorted(unknown)}; valid: {', '.join(RESET_OPTIONS)}")
        split = options.get("instruction_split", self.instruction_split)
        validate_choice("instruction split", split, INSTRUCTION_SPLITS)

        # Meta-World draws the variation (its `_last_rand_vec`) from its own np_random, which
        # is ours: the scene is a function of the seed, never of the global numpy state.
        self._mw.np_random = self.np_random
        obs, _ = self._mw.reset()
        # Meta-World moves bodies and the goal site in the model after its last forward pass
        # (the drawer, say, would show where the previous draw put it): recompute positions.
        mujoco.mj_forward(self.model, self.data)
        templates = INSTRUCTIONS[self.task][split]
        instruction = templates[self.np_random.integers(len(templates))]
        if "instruction" in options:
            instruction = check_instruction(options["instruction"])
        self.instruction, self.steps, self._success = instruction, 0, False
        self._mw_obs = obs.astype(np.float32)
        return self._observation(), self.privileged_info()

    def step(self, action):
        if self._mw_obs is None:
            raise RuntimeError("call reset() before step()")
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (4,) or not np.all(np.isfinite(action)):
            raise ValueError(f"action must be 4 finite numbers in [-1, 1] (hand dx, dy, dz, gripper), "
                             f"got {action!r}")
        obs, _, _, _, mw_info = self._mw.step(np.clip(action, -1.0, 1.0))
        self.steps += 1
        self._mw_obs = obs.astype(np.float32)
        self._success = bool(mw_info["success"])
        truncated = self.steps >= self.max_steps and not self._success
        return self._observation(), float(self._success), self._success, truncated, self.privileged_info()

    def render(self):
        if self.render_mode != "rgb_array":
            return None
        return self._render(self.render_camera, self.render_hw)

    def close(self):
        if self.renderer is not None:
            self.renderer.close()
            self.renderer = None
        self._mw.close()

    # --------------------------------------------------------------- for wrappers and tools
    def render_pixels(self) -> dict[str, np.ndarray]:
        """The `pixels` observation of the current state."""
        return {c: self._render(c, self.image_hw) for c in self.cameras}

    def privileged_info(self) -> dict[str, Any]:
        obs = self._mw_obs
        return {
            "is_success": self._success,
            "task": {"family": self.task, "budget": self.max_steps},
            "instruction": self.instruction,
            "mw_obs": obs.copy(),
            "object_pos": obs[4:7].copy(),
            "goal_pos": obs[-3:].copy(),
        }

    # ------------------------------------------------------------------------------ private
    def _observation(self) -> dict[str, Any]:
        return {
            "pixels": self.render_pixels(),
            "state": np.clip(self._mw_obs[:4], STATE_LOW, STATE_HIGH),
            "instruction": self.instruction,
        }

    def _render(self, camera: str, hw: tuple[int, int]) -> np.ndarray:
        if self.renderer is None:
            self.renderer = Renderer(self.model)
        cam = self.camera_ids[camera]
        img = self.renderer.render(self.data, cam, *hw)
        if self.data.cam_xmat[cam, 7] < 0:
            # The camera's image-up axis points at the floor (Meta-World's corner cameras):
            # turn the frame by 180 degrees so the table is at the bottom.
            img = np.ascontiguousarray(img[::-1, ::-1])
        return img


class MetaWorldExpert:
    """Meta-World's scripted policy for one task, acting from `info["mw_obs"]`.

    `noise` in [0, 1] as in `ScriptedExpert`: temporally correlated (Ornstein-Uhlenbeck) action
    noise of standard deviation `noise` with a ~0.5 s correlation time (at 80 Hz), on all four
    action entries. There are no lapses: at 80 Hz the noise alone already produces failures.
    """

    def __init__(self, task: str, noise: float = 0.0, rng: np.random.Generator | None = None):
        validate_choice("Meta-World task", task, METAWORLD_TASKS)
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"expert noise must be in [0, 1], got {noise}")
        from metaworld.policies import ENV_POLICY_MAP  # lazy: imports Meta-World

        self.task, self.noise = task, noise
        self.rng = rng if rng is not None else np.random.default_rng()
        self.policy = ENV_POLICY_MAP[task]()
        self.reset()

    def reset(self) -> None:
        self._ou = np.zeros(4)

    def act(self, info: dict) -> np.ndarray:
        if info["task"]["family"] != self.task:
            raise ValueError(f"this expert solves {self.task!r} but the env runs "
                             f"{info['task']['family']!r}; make MetaWorldExpert({info['task']['family']!r})")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Meta-World's `move` warns whenever its gain saturates
            action = np.asarray(self.policy.get_action(np.asarray(info["mw_obs"], np.float64)), float)
        if self.noise > 0:
            theta = 1.0 / (0.5 * CONTROL_HZ)
            self._ou = (1 - theta) * self._ou + np.sqrt(1 - (1 - theta) ** 2) * self.rng.standard_normal(4)
            action = action + self.noise * self._ou
        return np.clip(action, -1.0, 1.0).astype(np.float32)


def _make_metaworld(task: str):
    """Meta-World's env for `task`, set up to draw a task variation from its np_random at reset."""
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS  # lazy: Meta-World takes ~1 s to import

    env = ALL_V3_ENVIRONMENTS[task]()
    env._set_task_called = True  # we vary the task ourselves instead of via MT1's task list
    env._freeze_rand_vec = False
    env.seeded_rand_vec = True
    # Goal-observable, as in Meta-World's MT benchmarks: the scripted policies read the goal
    # from the state vector. Its observation space is cached with the goal zeroed, so drop it.
    env._partially_observable = False
    env.__dict__.pop("sawyer_observation_space", None)
    return env


__all__ = ["METAWORLD_TASKS", "INSTRUCTIONS", "BUDGETS", "CAMERAS", "MetaWorldEnv", "MetaWorldExpert",
           "metaworld_id", "register_metaworld"]
