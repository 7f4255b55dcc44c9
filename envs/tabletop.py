"""`foresight/Tabletop-v0`: a pusher, 1-4 objects, pads and language instructions on a MuJoCo table."""

from __future__ import annotations

from typing import Any, Sequence

import gymnasium as gym
import mujoco
import numpy as np
from gymnasium import spaces

from . import scene
from .scene import (CAMERAS, COLOURS, HIDDEN_GROUP, N_OBJECT_SLOTS, OBJECT_HALF, SHAPES, TABLE_HALF,
                    Renderer, SceneIndex, pad_rgb, shape_inertia)
from .tasks import (CHARSET, FAMILIES, INSTRUCTION_SPLITS, MAX_INSTRUCTION_LENGTH, SceneObject,
                    TaskSpec, advance, check_instruction, instruction_for, sample_task,
                    subgoal_met, validate_choice)

CONTROL_HZ = 10
MAX_SPEED = 0.3  # m/s of the pusher at |action| = 1
MAX_VELOCITY = 2.0  # bound of the velocity entries of `state` (collisions can briefly exceed MAX_SPEED)
RESET_OPTIONS = ("task", "instruction", "instruction_split")
MAX_IMAGE_SIZE = 1024


class TabletopEnv(gym.Env):
    """Language-conditioned pushing on a MuJoCo table.

    Action: `Box(-1, 1, (2,))`, the pusher's planar velocity as a fraction of MAX_SPEED, held for
    one 10 Hz control step (10 physics substeps of 10 ms).

    Observation (`Dict`):
      pixels       Dict of camera name -> uint8[H, W, 3]
      state        f32[4]: pusher x, y (m) and its velocity vx, vy (m/s)
      instruction  Text: what to do, in English

    `info` holds privileged truth for metrics and probes only (no model or planner reads it):
    `is_success`, `stage` (subgoals met so far, in order), `task` (the task spec as a dict),
    `object_names`, `object_pos` f32[n, 3], `object_quat` f32[n, 4], `pad_pos` f32[p, 2],
    `pusher_pos` f32[2].

    Reset options: `task` (a family name), `instruction` (replace the text, keep the task),
    `instruction_split` ("train" or "heldout" paraphrases).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": CONTROL_HZ}

    def __init__(
        self,
        tasks: Sequence[str] = FAMILIES,
        num_objects: Sequence[int] = (1, 4),
        colours: Sequence[str] = tuple(COLOURS),
        shapes: Sequence[str] = SHAPES,
        image_size: int | Sequence[int] = 64,
        cameras: Sequence[str] = ("top",),
        instruction_split: str = "train",
        render_mode: str | None = None,
        render_size: int = 256,
        render_camera: str = "top",
    ):
        self.tasks = tuple(tasks)
        if not self.tasks:
            raise ValueError(f"tasks is empty; choose from {', '.join(FAMILIES)}")
        for t in self.tasks:
            validate_choice("task", t, FAMILIES)
        for c in colours:
            validate_choice("colour", c, tuple(COLOURS))
        for s in shapes:
            validate_choice("shape", s, SHAPES)
        self.colours, self.shapes = tuple(colours), tuple(shapes)
        if len(num_objects) != 2 or not 1 <= num_objects[0] <= num_objects[1] <= 4:
            raise ValueError(f"num_objects must be (min, max) with 1 <= min <= max <= 4, got {num_objects}")
        self.num_objects = (int(num_objects[0]), int(num_objects[1]))
        self.image_hw = parse_image_size(image_size)
        self.cameras = tuple(cameras)
        if not self.cameras:
            raise ValueError(f"cameras is empty; choose from {', '.join(CAMERAS)}")
        for c in self.cameras + (render_camera,):
            validate_choice("camera", c, tuple(CAMERAS))
        validate_choice("instruction split", instruction_split, INSTRUCTION_SPLITS)
        self.instruction_split = instruction_split
        if render_mode is not None:
            validate_choice("render mode", render_mode, self.metadata["render_modes"])
        self.render_mode, self.render_camera = render_mode, render_camera
        self.render_hw = parse_image_size(render_size)

        self.model = scene.build_spec(max(*self.image_hw, *self.render_hw)).compile()
        self.data = mujoco.MjData(self.model)
        self.index = SceneIndex(self.model)
        self.substeps = round(1.0 / (CONTROL_HZ * self.model.opt.timestep))
        self.renderer: Renderer | None = None  # created on first use: a GL context per env

        h, w = self.image_hw
        self.action_space = spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.observation_space = spaces.Dict({
            "pixels": spaces.Dict({c: spaces.Box(0, 255, (h, w, 3), np.uint8) for c in self.cameras}),
            "state": spaces.Box(np.array([-TABLE_HALF, -TABLE_HALF, -MAX_VELOCITY, -MAX_VELOCITY], np.float32),
                                np.array([TABLE_HALF, TABLE_HALF, MAX_VELOCITY, MAX_VELOCITY], np.float32)),
            "instruction": spaces.Text(MAX_INSTRUCTION_LENGTH, min_length=1, charset=CHARSET),
        })

        self.task: TaskSpec | None = None
        self.instruction = ""
        self.stage = 0
        self.steps = 0
        # Object slots in use and what is in them: task objects first, then distractors.
        self.active: list[int] = []
        self.objects: list[SceneObject] = []

    # ----------------------------------------------------------------------------- gym API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = dict(options or {})
        unknown = set(options) - set(RESET_OPTIONS)
        if unknown:
            raise ValueError(f"unknown reset option(s) {sorted(unknown)}; valid: {', '.join(RESET_OPTIONS)}")
        family = options.get("task")
        if family is None:
            family = self.tasks[self.np_random.integers(len(self.tasks))]
        validate_choice("task", family, FAMILIES)
        split = options.get("instruction_split", self.instruction_split)
        validate_choice("instruction split", split, INSTRUCTION_SPLITS)

        task, obj_xy, pad_xy, pusher_xy = sample_task(
            family, self.np_random, self.num_objects, self.colours, self.shapes)
        instruction = instruction_for(task, split, self.np_random)
        if "instruction" in options:
            instruction = check_instruction(options["instruction"])
        self.task, self.instruction, self.stage, self.steps = task, instruction, 0, 0

        mujoco.mj_resetData(self.model, self.data)
        self.active, self.objects = [], []
        for slot in range(N_OBJECT_SLOTS):
            self._hide_slot(slot)
        for obj, xy in zip(task.objects, obj_xy):
            self.spawn_object(obj, xy, self.np_random.uniform(-np.pi, np.pi), forward=False)
        for slot, geom in enumerate(self.index.pad_geoms):
            shown = slot < len(task.pads)
            self.model.geom_group[geom] = 0 if shown else HIDDEN_GROUP
            if shown:
                self.model.geom_rgba[geom, :3] = pad_rgb(task.pads[slot])
                self.model.geom_pos[geom, :2] = pad_xy[slot]
        self.data.qpos[self.index.pusher_qpos] = pusher_xy
        mujoco.mj_forward(self.model, self.data)
        return self._observation(), self.privileged_info()

    def step(self, action):
        if self.task is None:
            raise RuntimeError("call reset() before step()")
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (2,) or not np.all(np.isfinite(action)):
            raise ValueError(f"action must be 2 finite numbers in [-1, 1], got {action!r}")
        self.data.ctrl[:] = np.clip(action, -1.0, 1.0) * MAX_SPEED
        mujoco.mj_step(self.model, self.data, nstep=self.substeps)
        self.steps += 1
        met = self._subgoals_met()
        self.stage, success = advance(self.stage, met)
        truncated = self.steps >= self.task.budget and not success
        return self._observation(), float(success), success, truncated, self.privileged_info(met)

    def render(self):
        if self.render_mode != "rgb_array":
            return None
        return self._render(self.render_camera, self.render_hw)

    def close(self):
        if self.renderer is not None:
            self.renderer.close()
            self.renderer = None

    # --------------------------------------------------------------- for wrappers and tools
    # Privileged arrays a dataset records per frame, NaN-padded to these shapes.
    privileged_shapes = {"object_pos": (N_OBJECT_SLOTS, 3), "object_quat": (N_OBJECT_SLOTS, 4),
                         "pad_pos": (scene.N_PAD_SLOTS, 2), "pusher_pos": (2,)}

    def make_expert(self, noise: float = 0.0, rng: np.random.Generator | None = None):
        """The scripted expert for this environment (data collection and reference numbers)."""
        from .experts import ScriptedExpert  # experts import this module

        return ScriptedExpert(noise, rng)

    def render_pixels(self) -> dict[str, np.ndarray]:
        """The `pixels` observation of the current state (wrappers re-render after edits)."""
        return {c: self._render(c, self.image_hw) for c in self.cameras}

    def object_xy(self) -> np.ndarray:
        """Planar positions [n, 2] of the active objects, task objects first."""
        return self.data.xpos[[self.index.object_bodies[s] for s in self.active], :2].copy()

    def privileged_info(self, met: list[bool] | None = None) -> dict[str, Any]:
        """The privileged truth of the current state (`met`: the subgoal checks, if known)."""
        bodies = [self.index.object_bodies[s] for s in self.active]
        met = self._subgoals_met() if met is None else met
        return {
            "is_success": self.stage == len(self.task.subgoals) and all(met),
            "stage": self.stage,
            "task": self.task.to_dict(),
            "instruction": self.instruction,
            "object_names": [o.name for o in self.objects],
            "object_pos": self.data.xpos[bodies].astype(np.float32),
            "object_quat": self.data.xquat[bodies].astype(np.float32),
            "pad_pos": self.model.geom_pos[self.index.pad_geoms[:len(self.task.pads)], :2].astype(np.float32),
            "pusher_pos": self.data.qpos[self.index.pusher_qpos].astype(np.float32),
        }

    def spawn_object(self, obj: SceneObject, xy, yaw: float, forward: bool = True) -> int:
        """Put an object in the next free slot at planar position `xy`; returns the slot."""
        free = [s for s in range(N_OBJECT_SLOTS) if s not in self.active]
        if not free:
            raise RuntimeError(f"all {N_OBJECT_SLOTS} object slots are in use")
        slot = free[0]
        for shape, geom in self.index.object_geoms[slot].items():
            on = shape == obj.shape
            self.model.geom_contype[geom] = self.model.geom_conaffinity[geom] = int(on)
            self.model.geom_group[geom] = 0 if on else HIDDEN_GROUP
            if on:
                self.model.geom_rgba[geom] = (*COLOURS[obj.colour], 1.0)
        body = self.index.object_bodies[slot]
        # MuJoCo's broad phase skips bodies by these body-level flags, compiled from the geoms.
        self.model.body_contype[body] = self.model.body_conaffinity[body] = 1
        self.model.body_gravcomp[body] = 0.0
        self.model.body_inertia[body] = shape_inertia(obj.shape)
        self.active.append(slot)
        self.objects.append(obj)
        self.place_object(slot, xy, yaw, forward)
        return slot

    def place_object(self, slot: int, xy, yaw: float = 0.0, forward: bool = True) -> None:
        """Teleport an object (at rest, upright) to `xy` with heading `yaw`."""
        a, v = self.index.object_qpos[slot], self.index.object_qvel[slot]
        self.data.qpos[a:a + 3] = (xy[0], xy[1], OBJECT_HALF)
        self.data.qpos[a + 3:a + 7] = (np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2))
        self.data.qvel[v:v + 6] = 0.0
        if forward:
            mujoco.mj_forward(self.model, self.data)

    # ------------------------------------------------------------------------------ private
    def _hide_slot(self, slot: int) -> None:
        for geom in self.index.object_geoms[slot].values():
            self.model.geom_contype[geom] = self.model.geom_conaffinity[geom] = 0
            self.model.geom_group[geom] = HIDDEN_GROUP
        # Parked below the table, weightless, out of every collision.
        body = self.index.object_bodies[slot]
        self.model.body_contype[body] = self.model.body_conaffinity[body] = 0
        self.model.body_gravcomp[body] = 1.0
        a = self.index.object_qpos[slot]
        self.data.qpos[a:a + 7] = (0.1 * slot, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0)

    def _subgoals_met(self) -> list[bool]:
        xy = self.object_xy()
        pusher = self.data.qpos[self.index.pusher_qpos]
        pads = {c: self.model.geom_pos[g, :2] for c, g in zip(self.task.pads, self.index.pad_geoms)}
        return [subgoal_met(s, xy, pusher, pads) for s in self.task.subgoals]

    def _observation(self) -> dict[str, Any]:
        pos = self.data.qpos[self.index.pusher_qpos]
        vel = self.data.qvel[self.index.pusher_qvel]
        return {
            "pixels": self.render_pixels(),
            "state": np.concatenate([pos, vel]).astype(np.float32),
            "instruction": self.instruction,
        }

    def _render(self, camera: str, hw: tuple[int, int]) -> np.ndarray:
        if self.renderer is None:
            self.renderer = Renderer(self.model)
        return self.renderer.render(self.data, self.index.cameras[camera], *hw)


def parse_image_size(size) -> tuple[int, int]:
    hw = (size, size) if np.isscalar(size) else tuple(size)
    if len(hw) != 2 or not all(isinstance(v, (int, np.integer)) and 8 <= v <= MAX_IMAGE_SIZE for v in hw):
        raise ValueError(f"image size must be an int or (height, width) of ints in [8, {MAX_IMAGE_SIZE}], "
                         f"got {size!r}")
    return int(hw[0]), int(hw[1])
