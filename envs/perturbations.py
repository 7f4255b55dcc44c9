"""Perturbation wrappers: the robustness axes of the evaluation protocol.

Each axis is a `gymnasium.Wrapper` with a `strength` in [0, 1]: 0 changes nothing, 1 is the
strongest setting that still leaves the task solvable and its instruction true. No wrapper
touches the task's meaning: the instruction, the task spec and every colour the instruction
names (objects and pads) stay as they are, so "the red cube" is still the one red cube.

Wrappers edit the shared `mjModel` (lights, cameras, texture pixels, rgba) or teleport objects,
and draw from their own `np.random.Generator` (never the env's `np_random`), so one seed gives
the same layout and task with and without perturbations. The inner env renders its observation
before a wrapper edits the scene, so scene edits re-render it; `apply_perturbations` stacks
them in the order that keeps every effect (scene edits, then camera shake, displacement, and
sensor noise outermost).

Edits live in the env's model and are redone at every reset, not undone: wrap a fresh env
(not one a perturbed run used) for unperturbed episodes.
"""

from __future__ import annotations

import colorsys
import math
import zlib
from typing import Any, Callable

import gymnasium as gym
import mujoco
import numpy as np

from .scene import COLOURS, OBJECT_HALF, PAD_RADIUS, SHAPES, N_OBJECT_SLOTS, pad_rgb
from .tabletop import CONTROL_HZ, MAX_SPEED
from .tasks import TOUCH_DISTANCE, SceneObject, subgoal_met

FREE_HALF = 0.2  # free positions are drawn in [-FREE_HALF, FREE_HALF]^2 (metres)
OBJECT_GAP = 3 * OBJECT_HALF  # centre distance kept between a placed object and any other
# Clear of the pusher by more than one control step's travel, so no touch happens by accident.
PUSHER_GAP = TOUCH_DISTANCE + MAX_SPEED / CONTROL_HZ + 0.01
COLOUR_GAP = 0.35  # least RGB distance of a perturbed colour from any named colour (or its pad tint)


def check_strength(axis: str, strength) -> float:
    """`strength` as a float, or a ValueError saying the valid range for this axis."""
    try:
        value = float(strength)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(strength, bool) or not 0.0 <= value <= 1.0:  # also rejects nan
        raise ValueError(f"{axis} strength must be a finite number in [0, 1] (0 = off, 1 = strongest), "
                         f"got {strength!r}")
    return value


class Perturbation(gym.Wrapper):
    """Base: strength, its own seeded generator, the `info["perturbations"]` tag and hooks.

    Subclasses fill in `on_reset` (after the inner reset), `before_step` and `after_step`;
    none of them runs at strength 0, so strength 0 is exactly the unperturbed env.
    """

    axis = ""

    def __init__(self, env: gym.Env, strength: float, seed: int | None = None):
        super().__init__(env)
        self.strength = check_strength(self.axis, strength)
        self._salt = zlib.crc32(self.axis.encode())  # per axis, so axes draw independent streams
        self.rng = np.random.default_rng(None if seed is None else [seed, self._salt])

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        if seed is not None:
            self.rng = np.random.default_rng([seed, self._salt])
        if self.strength > 0:
            self.before_reset()
        obs, info = self.env.reset(seed=seed, options=options)
        if self.strength > 0:
            obs, info = self.on_reset(obs, info)
        return obs, self._tag(info)

    def step(self, action):
        if self.strength > 0:
            self.before_step()
        obs, reward, terminated, truncated, info = self.env.step(action)
        if self.strength > 0:
            obs, info = self.after_step(obs, info)
        return obs, reward, terminated, truncated, self._tag(info)

    def before_reset(self) -> None:
        pass

    def on_reset(self, obs: dict, info: dict) -> tuple[dict, dict]:
        return obs, info

    def before_step(self) -> None:
        pass

    def after_step(self, obs: dict, info: dict) -> tuple[dict, dict]:
        return obs, info

    def rerender(self, obs: dict, info: dict, refresh_info: bool = False) -> tuple[dict, dict]:
        """The observation (and optionally `info`) again, after this wrapper edited the scene."""
        base = self.env.unwrapped
        mujoco.mj_forward(base.model, base.data)  # cameras and lights reach `data` here
        obs = {**obs, "pixels": base.render_pixels()}
        if refresh_info:
            info = {**info, **base.privileged_info()}
        return obs, info

    def _tag(self, info: dict) -> dict:
        return {**info, "perturbations": {**info.get("perturbations", {}), self.axis: self.strength}}


class SceneEdit(Perturbation):
    """A perturbation that edits the scene once per episode, right after the inner reset."""

    def edit(self) -> None:
        raise NotImplementedError

    def on_reset(self, obs, info):
        self.edit()
        return self.rerender(obs, info)


# ------------------------------------------------------------------------------ shared helpers
def _ball(rng: np.random.Generator, radius: float, dim: int = 3) -> np.ndarray:
    """A point drawn uniformly from the ball of `radius` around the origin."""
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)
    return direction * radius * rng.uniform() ** (1.0 / dim)


def _rotvec_quat(rotvec) -> np.ndarray:
    quat = np.array([1.0, 0.0, 0.0, 0.0])
    angle = float(np.linalg.norm(rotvec))
    if angle > 1e-12:
        mujoco.mju_axisAngle2Quat(quat, np.asarray(rotvec, float) / angle, angle)
    return quat


def _rotate(quat, vec) -> np.ndarray:
    out = np.zeros(3)
    mujoco.mju_rotVecQuat(out, np.asarray(vec, float), np.asarray(quat, float))
    return out


def _mul(a, b) -> np.ndarray:
    out = np.zeros(4)
    mujoco.mju_mulQuat(out, np.asarray(a, float), np.asarray(b, float))
    return out


def moved_camera(pos, quat, shift, turn) -> tuple[np.ndarray, np.ndarray]:
    """A camera pose moved by `shift` (m, world) and turned by `turn` (rotation vector, camera frame).

    After the shift the camera is re-aimed, with the smallest rotation (so no added roll), at the
    table point its base pose looked at; the table stays in view however it moves.
    """
    pos, quat = np.asarray(pos, float), np.asarray(quat, float)
    forward = _rotate(quat, (0.0, 0.0, -1.0))  # a MuJoCo camera looks along its -z
    depth = -pos[2] / forward[2] if forward[2] < -0.1 else 0.6
    target = pos + depth * forward
    new_pos = pos + np.asarray(shift, float)
    new_forward = (target - new_pos) / np.linalg.norm(target - new_pos)
    axis = np.cross(forward, new_forward)
    angle = math.atan2(np.linalg.norm(axis), float(forward @ new_forward))
    aim = _rotvec_quat(axis / max(np.linalg.norm(axis), 1e-12) * angle)
    new_quat = _mul(_mul(aim, quat), _rotvec_quat(turn))
    return new_pos, new_quat / np.linalg.norm(new_quat)


def named_rgb(task) -> np.ndarray:
    """[k, 3] RGB of every colour the instruction names, as object and as pad tint."""
    names = sorted(task.named_colours)
    return np.array([COLOURS[c] for c in names] + [pad_rgb(c) for c in names]).reshape(-1, 3)


def far_colours(rng: np.random.Generator, sample: Callable[[np.random.Generator], np.ndarray],
                avoid: np.ndarray, tries: int = 64) -> np.ndarray:
    """Colours from `sample` (rng -> [k, 3]) whose every row is >= COLOUR_GAP from all `avoid` rows.

    Draws `tries` candidates and returns the first that qualifies, else the one farthest away.
    """
    best, best_gap = None, -1.0
    for _ in range(tries):
        cand = np.clip(np.atleast_2d(sample(rng)), 0.0, 1.0)
        gap = np.min(np.linalg.norm(cand[:, None] - avoid[None], axis=-1)) if len(avoid) else np.inf
        if gap >= COLOUR_GAP:
            return cand
        if gap > best_gap:
            best, best_gap = cand, gap
    return best


def free_xy(rng: np.random.Generator, avoid: list[tuple[np.ndarray, float]],
            accept: Callable[[np.ndarray], bool] | None = None, tries: int = 200) -> np.ndarray | None:
    """A planar point in the free table area clear of every (point, radius) in `avoid`, or None."""
    for _ in range(tries):
        xy = rng.uniform(-FREE_HALF, FREE_HALF, size=2)
        if all(np.linalg.norm(xy - p) >= r for p, r in avoid) and (accept is None or accept(xy)):
            return xy
    return None


def _pusher_xy(base) -> np.ndarray:
    return base.data.qpos[base.index.pusher_qpos].copy()


def _pad_xy(base) -> dict[str, np.ndarray]:
    return {c: base.model.geom_pos[g, :2].copy() for c, g in zip(base.task.pads, base.index.pad_geoms)}


# --------------------------------------------------------------------------------------- axes
class Lighting(SceneEdit):
    """The sun's intensity, tint and direction and the headlight's intensity, per episode.

    Intensities scale by a factor in [1 - 0.6 s, 1 + 0.6 s] with a tint of at most 10 % s per
    channel, and the sun tilts up to 45 deg * s: scenes get darker or brighter, never black.
    """

    axis = "lighting"

    def __init__(self, env, strength, seed=None):
        super().__init__(env, strength, seed)
        model = self.env.unwrapped.model
        self._base = (model.light_diffuse[0].copy(), model.light_ambient[0].copy(), model.light_dir[0].copy(),
                      model.vis.headlight.diffuse.copy(), model.vis.headlight.ambient.copy())

    def edit(self):
        model, s = self.env.unwrapped.model, self.strength
        diffuse, ambient, direction, head_diffuse, head_ambient = self._base
        gain = (1 + 0.6 * s * self.rng.uniform(-1, 1)) * (1 + 0.1 * s * self.rng.uniform(-1, 1, 3))
        model.light_diffuse[0] = diffuse * gain
        model.light_ambient[0] = ambient * gain
        tilt = np.array([*_ball(self.rng, 1.0, 2), 0.0])  # a horizontal axis; its length sets the tilt
        model.light_dir[0] = _rotate(_rotvec_quat(tilt * math.radians(45) * s), direction)
        head_gain = 1 + 0.6 * s * self.rng.uniform(-1, 1)
        model.vis.headlight.diffuse[:] = head_diffuse * head_gain
        model.vis.headlight.ambient[:] = head_ambient * head_gain


class Table(SceneEdit):
    """The table texture: (1 - s) * the plain table + s * a random checker, stripe or noise pattern.

    Pattern colours are muted (low saturation) and kept away from every named colour.
    """

    axis = "table"
    PATTERNS = ("checker", "stripes", "noise")

    def __init__(self, env, strength, seed=None):
        super().__init__(env, strength, seed)
        base = self.env.unwrapped
        tex = base.index.table_tex
        self._h, self._w, self._c = (int(base.model.tex_height[tex]), int(base.model.tex_width[tex]),
                                     int(base.model.tex_nchannel[tex]))
        adr = int(base.model.tex_adr[tex])
        self._slice = slice(adr, adr + self._h * self._w * self._c)
        self._plain = base.model.tex_data[self._slice].astype(float).reshape(self._h, self._w, self._c)

    def _muted(self, rng):
        hue, sat, val = rng.uniform(), rng.uniform(0.0, 0.35), rng.uniform(0.35, 0.9)
        first = np.array(colorsys.hsv_to_rgb(hue, sat, val))
        return np.stack([first, first * rng.uniform(0.55, 0.8)])  # a colour and a darker shade

    def _mask(self) -> np.ndarray:
        """[h, w] in [0, 1]: where the pattern shows its second colour."""
        h, w, rng = self._h, self._w, self.rng
        y, x = np.mgrid[0:h, 0:w] / max(h, w)
        kind = self.PATTERNS[rng.integers(len(self.PATTERNS))]
        if kind == "checker":
            cells = rng.integers(3, 11)
            return ((np.floor(x * cells) + np.floor(y * cells)) % 2).astype(float)
        if kind == "stripes":
            angle, period = rng.uniform(0, np.pi), rng.uniform(0.06, 0.25)
            return (np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period) > 0).astype(float)
        cell = int(rng.choice([2, 4, 8]))  # blocky value noise, texels per cell
        noise = rng.uniform(size=(-(-h // cell), -(-w // cell)))
        return np.kron(noise, np.ones((cell, cell)))[:h, :w]

    def edit(self):
        base, s = self.env.unwrapped, self.strength
        colours = far_colours(self.rng, self._muted, named_rgb(base.task)) * 255
        mask = self._mask()[..., None]
        pattern = colours[0] * (1 - mask) + colours[1] * mask
        tex = (1 - s) * self._plain + s * pattern[..., :self._c]
        base.model.tex_data[self._slice] = np.clip(np.rint(tex), 0, 255).astype(np.uint8).ravel()
        if base.renderer is None:
            base.render_pixels()  # creates the renderer (it uploads every texture itself)
        base.renderer.upload_texture(base.index.table_tex)


class DistractorColours(SceneEdit):
    """Recolours every object whose colour the instruction does not name.

    Each moves from its palette colour towards a random colour, by `strength`; the result stays
    away from every named colour, so the named objects remain the only ones of their colour.
    """

    axis = "distractor_colours"

    def edit(self):
        base, s = self.env.unwrapped, self.strength
        avoid = named_rgb(base.task)
        for slot, obj in zip(base.active, base.objects):
            if obj.colour in base.task.named_colours:
                continue
            palette = np.array(COLOURS[obj.colour])
            rgb = far_colours(self.rng, lambda rng, p=palette: (1 - s) * p + s * rng.uniform(0, 1, 3), avoid)[0]
            base.model.geom_rgba[base.index.object_geoms[slot][obj.shape], :3] = rgb


class _CameraJitter(Perturbation):
    """Shared by the camera axes: re-pose the observation cameras around base poses."""

    SHIFT = 0.0  # metres at strength 1
    TURN = (0.0, 0.0, 0.0)  # degrees at strength 1 about the camera's x (pitch), y (yaw), z (roll)

    def _read_poses(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        base = self.env.unwrapped
        ids = [base.index.cameras[c] for c in base.cameras]
        return {i: (base.model.cam_pos[i].copy(), base.model.cam_quat[i].copy()) for i in ids}

    def _jitter(self, poses) -> None:
        model, s = self.env.unwrapped.model, self.strength
        for i, (pos, quat) in poses.items():
            model.cam_pos[i], model.cam_quat[i] = moved_camera(
                pos, quat, _ball(self.rng, self.SHIFT * s), _ball(self.rng, 1.0) * np.radians(self.TURN) * s)


class CameraPose(_CameraJitter, SceneEdit):
    """Per episode, every observation camera moves up to 6 cm * s, re-aimed at the table, then
    turns up to 5 deg * s in pitch and yaw and 10 deg * s in roll (more pitch or yaw would turn
    the top view's table edges out of the frame)."""

    axis = "camera_pose"
    SHIFT, TURN = 0.06, (5.0, 5.0, 10.0)

    def __init__(self, env, strength, seed=None):
        super().__init__(env, strength, seed)
        self.base_poses = self._read_poses()  # the model's own poses, read once

    def edit(self):
        self._jitter(self.base_poses)


class CameraShake(_CameraJitter):
    """Every frame, the cameras jitter up to 1.5 cm * s and 3 deg * s around the episode's pose.

    The episode's pose is read at reset after inner wrappers (e.g. `camera_pose`) set theirs,
    and put back before the next reset; the jitter is applied before the inner step, so the frame
    rendered inside the step shows it.
    """

    axis = "camera_shake"
    SHIFT, TURN = 0.015, (3.0, 3.0, 3.0)

    def __init__(self, env, strength, seed=None):
        super().__init__(env, strength, seed)
        self.base_poses: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def before_reset(self):
        model = self.env.unwrapped.model
        for i, (pos, quat) in self.base_poses.items():  # undo the last jitter
            model.cam_pos[i], model.cam_quat[i] = pos, quat

    def on_reset(self, obs, info):
        self.base_poses = self._read_poses()
        self._jitter(self.base_poses)
        return self.rerender(obs, info)

    def before_step(self):
        self._jitter(self.base_poses)


class SensorNoise(Perturbation):
    """Gaussian noise on every camera (sigma 25 grey levels * s) and on `state`
    (0.005 m * s on positions, 0.02 m/s * s on velocities)."""

    axis = "noise"
    PIXEL_SIGMA = 25.0
    STATE_SIGMA = (0.005, 0.005, 0.02, 0.02)

    def on_reset(self, obs, info):
        return self._noisy(obs), info

    def after_step(self, obs, info):
        return self._noisy(obs), info

    def _noisy(self, obs: dict) -> dict:
        s, rng = self.strength, self.rng
        pixels = {c: np.clip(np.rint(img + rng.normal(0.0, self.PIXEL_SIGMA * s, img.shape)), 0, 255)
                  .astype(np.uint8) for c, img in obs["pixels"].items()}
        space = self.env.unwrapped.observation_space["state"]
        state = obs["state"] + rng.normal(0.0, 1.0, obs["state"].shape) * np.array(self.STATE_SIGMA) * s
        return {**obs, "pixels": pixels, "state": np.clip(state, space.low, space.high).astype(np.float32)}


class Distractors(SceneEdit):
    """Adds round(2 s) (at least 1) extra objects in free slots and free spots.

    Their colours are palette colours neither named nor worn by a task object, so every
    instruction still picks out exactly one object; they keep clear of objects, pads and pusher.
    """

    axis = "distractors"

    def on_reset(self, obs, info):
        self.edit()
        return self.rerender(obs, info, refresh_info=True)

    def edit(self):
        base, rng = self.env.unwrapped, self.rng
        taken = base.task.named_colours | {o.colour for o in base.objects}
        colours = [c for c in COLOURS if c not in taken]
        n = min(max(1, round(2 * self.strength)), len(colours), N_OBJECT_SLOTS - len(base.active))
        for i in rng.choice(len(colours), size=n, replace=False):
            avoid = [(xy, OBJECT_GAP) for xy in base.object_xy()]
            avoid += [(xy, PAD_RADIUS + OBJECT_HALF) for xy in _pad_xy(base).values()]
            avoid.append((_pusher_xy(base), PUSHER_GAP))
            xy = free_xy(rng, avoid)
            if xy is None:
                break
            shape = SHAPES[rng.integers(len(SHAPES))]
            base.spawn_object(SceneObject(colours[i], shape), xy, rng.uniform(-np.pi, np.pi))


class Displace(Perturbation):
    """Once per episode, at a random step in [5, 15], the current subgoal's object jumps away.

    It lands at least 0.05 + 0.1 s m from where it was, clear of other objects and the pusher,
    and where its subgoal does not hold; if no such spot turns up the episode goes undisturbed.
    `info["displaced_at"]` is the step it happened at (None before, or if it never does).
    """

    axis = "displace"
    FIRST, LAST = 5, 15

    def __init__(self, env, strength, seed=None):
        super().__init__(env, strength, seed)
        self._trigger, self._steps, self.displaced_at = None, 0, None

    def on_reset(self, obs, info):
        self._trigger = int(self.rng.integers(self.FIRST, self.LAST + 1))
        self._steps, self.displaced_at = 0, None
        return obs, {**info, "displaced_at": None}

    def before_step(self):
        self._steps += 1
        base = self.env.unwrapped
        if self._steps != self._trigger or base.task is None or base.stage >= len(base.task.subgoals):
            return
        sub = base.task.subgoals[base.stage]
        xy, pusher, pads = base.object_xy(), _pusher_xy(base), _pad_xy(base)
        avoid = [(p, OBJECT_GAP) for k, p in enumerate(xy) if k != sub.object]
        avoid += [(xy[sub.object].copy(), 0.05 + 0.1 * self.strength), (pusher, PUSHER_GAP)]

        def unmet(candidate):
            moved = xy.copy()
            moved[sub.object] = candidate
            return not subgoal_met(sub, moved, pusher, pads)

        new_xy = free_xy(self.rng, avoid, accept=unmet)
        if new_xy is not None:
            base.place_object(base.active[sub.object], new_xy, self.rng.uniform(-np.pi, np.pi))
            self.displaced_at = self._steps

    def after_step(self, obs, info):
        return obs, {**info, "displaced_at": self.displaced_at}


# Canonical wrapping order, innermost first: scene edits, then camera shake (it reads the pose
# the scene edits set), displacement, and sensor noise last (no later re-render may drop it).
PERTURBATIONS: dict[str, type[Perturbation]] = {
    cls.axis: cls for cls in (Lighting, Table, Distractors, DistractorColours, CameraPose,
                              CameraShake, Displace, SensorNoise)
}
AXES = tuple(PERTURBATIONS)


def apply_perturbations(env: gym.Env, strengths: dict[str, float], seed: int | None = None) -> gym.Env:
    """Wrap `env` in every axis of `strengths` ({axis: strength in [0, 1]}) with a nonzero strength.

    Axes are stacked in the canonical order of `AXES` whatever the dict order. `seed` seeds the
    wrappers' generators until a `reset(seed=...)` re-seeds them.
    """
    unknown = sorted(set(strengths) - set(AXES))
    if unknown:
        raise ValueError(f"unknown perturbation axis {', '.join(map(repr, unknown))}; "
                         f"valid axes: {', '.join(AXES)}")
    checked = {axis: check_strength(axis, s) for axis, s in strengths.items()}
    for axis in AXES:
        if checked.get(axis, 0.0) > 0:
            env = PERTURBATIONS[axis](env, checked[axis], seed=seed)
    return env


__all__ = ["AXES", "PERTURBATIONS", "Perturbation", "apply_perturbations", "check_strength",
           "Lighting", "Table", "DistractorColours", "CameraPose", "CameraShake", "SensorNoise",
           "Distractors", "Displace"]
