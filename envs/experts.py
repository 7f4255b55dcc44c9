"""Scripted experts: closed-loop controllers that read the privileged truth in `info`.

For data generation and reference numbers only: no model or planner ever sees `info`. They act
from `info` alone, so they work unchanged through any wrapper.

Pushing uses the classic approach-from-behind strategy: circle the object at a safe radius to
the point behind it on the object->goal line, then push along that line while correcting the
lateral offset. The push turns continuously into sideways re-centring as that offset grows: an
earlier version backed off to re-align instead and chattered between the two on 22% of its
push-to-pad steps, which made it much harder to imitate. Near a wall the ideal approach point
can be out of reach; the expert then pushes in the nearest direction whose approach point it
can reach, which walks the object off the wall first.
"""

from __future__ import annotations

import numpy as np

from .scene import OBJECT_HALF, PUSHER_RADIUS, TABLE_HALF
from .tabletop import CONTROL_HZ, MAX_SPEED
from .tasks import REGIONS, Subgoal, advance, subgoal_met

STEP = MAX_SPEED / CONTROL_HZ  # metres moved in one control step at |action| = 1
CONTACT = OBJECT_HALF + PUSHER_RADIUS  # centre distance when pusher touches a cube face
BEHIND = CONTACT + 0.012  # where the pusher lines up before a push
ORBIT = CONTACT + 0.03  # radius at which it circles an object without touching it
AVOID = CONTACT + 0.025  # obstacles closer than this (centre to centre) are steered round
REACH = TABLE_HALF - PUSHER_RADIUS - 0.004  # the pusher centre's reachable box
REGION_MARGIN = 0.05  # aim this far inside a region's boundary
PUSH_CONE = 0.45  # rad: how far round from straight behind the object the pusher may push from
LINE_TOLERANCE = 0.025  # lateral offset from the push line at which pushing turns into re-centring


class ScriptedExpert:
    """Solves every tabletop task family from privileged state.

    `noise` in [0, 1] makes it a realistic, fallible demonstrator for world-model data:
    - temporally correlated (Ornstein-Uhlenbeck) action noise of standard deviation `noise`;
    - lapses: each step, with probability LAPSE_RATE * noise, it spends 5-20 steps pushing a
      random object toward a random spot, so failures (and the wrong object moved) happen.
    0 is the clean expert; at 0.3 it solves 80-84% of push episodes (measured, see the README).
    """

    LAPSE_RATE = 0.15

    def __init__(self, noise: float = 0.0, rng: np.random.Generator | None = None):
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"expert noise must be in [0, 1], got {noise}")
        self.noise = noise
        self.rng = rng if rng is not None else np.random.default_rng()
        self.reset()

    def reset(self) -> None:
        self._ou = np.zeros(2)
        self._lapse_steps, self._lapse = 0, (0, np.zeros(2))

    def act(self, info: dict) -> np.ndarray:
        if self.noise > 0 and self._lapse_steps == 0 and self.rng.uniform() < self.LAPSE_RATE * self.noise:
            n_objects = len(info["object_names"])
            self._lapse_steps = int(self.rng.integers(5, 21))
            self._lapse = (int(self.rng.integers(n_objects)), self.rng.uniform(-0.18, 0.18, 2))
        if self._lapse_steps > 0:
            self._lapse_steps -= 1
            objects = np.asarray(info["object_pos"])[:, :2]
            index, goal = self._lapse
            action = _push(np.asarray(info["pusher_pos"], float), objects[index], goal,
                           np.delete(objects, index, axis=0))
        else:
            action = self.clean_action(info)
        if self.noise > 0:
            # OU noise with unit stationary variance and ~0.5 s correlation time.
            theta = 0.2
            self._ou = (1 - theta) * self._ou + np.sqrt(1 - (1 - theta) ** 2) * self.rng.standard_normal(2)
            action = action + self.noise * self._ou
        return np.clip(action, -1.0, 1.0).astype(np.float32)

    def clean_action(self, info: dict) -> np.ndarray:
        objects = np.asarray(info["object_pos"])[:, :2]
        pusher = np.asarray(info["pusher_pos"], dtype=float)
        todo = current_subgoal(info)
        if todo is None:
            return np.zeros(2)
        obstacles = np.delete(objects, todo.object, axis=0)
        if todo.kind == "touch":
            return _go_to(pusher, objects[todo.object], obstacles)
        return _push(pusher, objects[todo.object], _subgoal_goal(todo, objects, info), obstacles)


def _subgoals(info: dict) -> list[Subgoal]:
    names = info["object_names"]
    return [Subgoal(names.index(s["object"]), s["kind"], s["target"]) for s in info["task"]["subgoals"]]


def current_subgoal(info: dict) -> Subgoal | None:
    """The subgoal to work on: the next in order; once all were reached, any that slipped (None: none)."""
    subgoals = _subgoals(info)
    if info["stage"] < len(subgoals):
        return subgoals[info["stage"]]
    objects = np.asarray(info["object_pos"])[:, :2]
    pads = dict(zip(info["task"]["pads"], np.asarray(info["pad_pos"])))
    met = [subgoal_met(s, objects, np.asarray(info["pusher_pos"], dtype=float), pads) for s in subgoals]
    return next((s for s, m in zip(subgoals, met) if not m), None)


def _subgoal_goal(sub: Subgoal, objects: np.ndarray, info: dict) -> np.ndarray:
    """Where the subgoal's object must go (its own position for touch)."""
    if sub.kind == "pad":
        return np.asarray(info["pad_pos"])[info["task"]["pads"].index(sub.target)]
    if sub.kind == "region":
        return _region_goal(objects[sub.object], sub.target)
    return objects[sub.object]


MAX_SUBGOALS = 2  # the longest task (two_step)
N_NAMED_POINTS = 1 + 2 * MAX_SUBGOALS
PAD_TOP = 0.002  # height of a pad's upper face
PUSHER_TOP = 0.051  # height of the pusher's upper face


def named_points(info: dict) -> np.ndarray:
    """The pusher, then the visible things the instruction names in its order, [N_NAMED_POINTS, 3]
    world points: each subgoal's object and the place it must go (a pad; for touch, the object
    itself); NaN where there is none (a region is not a thing in view; a one-step task has no
    second subgoal). A training signal for perception only."""
    out = np.full((N_NAMED_POINTS, 3), np.nan, np.float32)
    out[0] = (*info["pusher_pos"], PUSHER_TOP)
    objects = np.asarray(info["object_pos"], dtype=float)
    for k, sub in enumerate(_subgoals(info)):
        out[1 + 2 * k] = objects[sub.object]
        if sub.kind != "region":
            height = objects[sub.object, 2] if sub.kind == "touch" else PAD_TOP
            out[2 + 2 * k] = (*_subgoal_goal(sub, objects[:, :2], info), height)
    return out


def replay_infos(task: dict, object_pos: np.ndarray, pad_pos: np.ndarray, pusher_pos: np.ndarray):
    """The privileged `info` of every recorded frame of an episode, rebuilt from what a dataset
    stores (object_pos [T, n, 3], pad_pos [T, p, 2], pusher_pos [T, 2], NaN-padded; the task spec),
    with the subgoal stage recomputed as the env tracks it."""
    n_obj, n_pad = len(task["objects"]), len(task["pads"])
    met, stage = subgoals_met(task, object_pos, pad_pos, pusher_pos), 0
    for t in range(len(pusher_pos)):
        info = {"task": task, "object_names": task["objects"], "object_pos": object_pos[t, :n_obj],
                "pad_pos": pad_pos[t, :n_pad], "pusher_pos": pusher_pos[t]}
        stage, _ = advance(stage, list(met[t]))
        yield {**info, "stage": stage}


def subgoals_met(task: dict, object_pos: np.ndarray, pad_pos: np.ndarray, pusher_pos: np.ndarray) -> np.ndarray:
    """Whether each of the task's subgoals holds at every recorded frame of an episode, bool [T, S]
    (`replay_infos`' arguments)."""
    n_obj, n_pad = len(task["objects"]), len(task["pads"])
    subgoals = _subgoals({"task": task, "object_names": task["objects"]})
    met = [[subgoal_met(s, object_pos[t, :n_obj, :2], pusher_pos[t], dict(zip(task["pads"], pad_pos[t, :n_pad])))
            for s in subgoals] for t in range(len(pusher_pos))]
    return np.array(met, dtype=bool).reshape(len(pusher_pos), len(subgoals))


def expert_labels(task: dict, object_pos: np.ndarray, pad_pos: np.ndarray, pusher_pos: np.ndarray) -> np.ndarray:
    """The clean expert's action at every recorded frame of an episode [T, 2] (`replay_infos`'
    arguments). Relabelling the states a noisy expert visited this way gives demonstrations of
    recovery (DART, Laskey et al. 2017) without collecting anything new."""
    expert = ScriptedExpert()
    actions = [expert.clean_action(info) for info in replay_infos(task, object_pos, pad_pos, pusher_pos)]
    return np.clip(np.array(actions, dtype=np.float32), -1.0, 1.0)


def _region_goal(obj: np.ndarray, region: str) -> np.ndarray:
    """The nearest point to the object lying well inside the region."""
    x0, x1, y0, y1 = REGIONS[region]
    lo = np.array([max(x0, -REACH) + REGION_MARGIN, max(y0, -REACH) + REGION_MARGIN])
    hi = np.array([min(x1, REACH) - REGION_MARGIN, min(y1, REACH) - REGION_MARGIN])
    return np.clip(obj, np.minimum(lo, hi), np.maximum(lo, hi))


def _velocity_to(pusher: np.ndarray, target: np.ndarray, speed: float = 1.0) -> np.ndarray:
    """Action that moves toward `target`, arriving without overshoot, at most `speed`."""
    delta = (target - pusher) / STEP
    norm = np.linalg.norm(delta)
    return delta * min(1.0, speed / norm) * 0.8 if norm > 1e-9 else np.zeros(2)


def _go_to(pusher, target, obstacles, speed=1.0):
    """Head for `target`, sliding round obstacles ahead instead of stalling against them."""
    action = _velocity_to(pusher, target, speed)
    heading = target - pusher
    for ob in obstacles:
        away = pusher - ob
        dist = np.linalg.norm(away)
        if dist < AVOID and away @ heading < 0 and dist < np.linalg.norm(heading):
            normal = away / max(dist, 1e-6)
            tangent = np.array([-normal[1], normal[0]])
            if tangent @ heading < 0:
                tangent = -tangent
            strength = (AVOID - dist) / (AVOID - CONTACT)
            action = action + strength * (0.3 * normal + tangent)
    return action


def _push(pusher, obj, goal, obstacles):
    to_goal = goal - obj
    dist = np.linalg.norm(to_goal)
    if dist < 1e-3:
        return np.zeros(2)
    u = _reachable_direction(obj, to_goal / dist)
    perp = np.array([-u[1], u[0]])
    rel = pusher - obj
    along, lateral = rel @ u, rel @ perp
    angle_now = np.arctan2(rel[1], rel[0])
    turn = (np.arctan2(-u[1], -u[0]) - angle_now + np.pi) % (2 * np.pi) - np.pi
    if along < -CONTACT + 0.012 and abs(turn) <= PUSH_CONE:
        # Close behind the object: push through its centre while steering out the lateral error,
        # less forward the further off the line (at LINE_TOLERANCE only sideways). Continuous in
        # the offset, so the pusher does not chatter between pushing and backing off to re-align.
        # Slow down near the goal so the object does not slide or roll past it.
        speed = float(np.clip(dist / 0.06, 0.25, 1.0))
        w = float(np.clip(1 - abs(lateral) / LINE_TOLERANCE, 0.0, 1.0))
        ahead = w * (min(dist, 0.05) + CONTACT - 0.01) - (1 - w) * (CONTACT + 0.005)
        return _velocity_to(pusher, obj + u * ahead - perp * lateral, speed)
    behind = obj - u * BEHIND
    if abs(turn) <= 0.3:
        return _go_to(pusher, behind, obstacles)
    # Circle round the object to its far side, the short way unless a wall is in the way of
    # that arc (then the long way, or whichever arc leaves the table least).
    arcs = [turn, turn - np.sign(turn) * 2 * np.pi]
    arc = min(arcs, key=lambda a: (_arc_outside(obj, angle_now, a), abs(a)))
    waypoint = _orbit_point(obj, angle_now + np.sign(arc) * min(abs(arc), 0.7))
    return _go_to(pusher, waypoint, obstacles)


def _orbit_point(obj, angle) -> np.ndarray:
    """Point at `angle` round the object: ORBIT away, pulled in (down to just clear) at walls."""
    d = np.array([np.cos(angle), np.sin(angle)])
    radius = ORBIT
    for i in range(2):
        if abs(d[i]) > 1e-6:
            room = (np.sign(d[i]) * REACH - obj[i]) / d[i]
            radius = min(radius, room)
    radius = max(radius, CONTACT + 0.004)
    return np.clip(obj + radius * d, -REACH, REACH)


def _arc_outside(obj, start, arc) -> float:
    """How far (summed, metres) an orbit arc would have to leave the pusher's reach."""
    total = 0.0
    for angle in start + np.linspace(0.0, arc, 12):
        d = np.array([np.cos(angle), np.sin(angle)])
        total += float(np.clip(np.abs(obj + (CONTACT + 0.004) * d) - REACH, 0.0, None).sum())
    return total


def _reachable_direction(obj: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The push direction closest to `u` whose approach point the pusher can reach."""
    for offset in np.deg2rad([0, 15, -15, 30, -30, 45, -45, 60, -60, 75, -75, 90, -90]):
        c, s = np.cos(offset), np.sin(offset)
        cand = np.array([c * u[0] - s * u[1], s * u[0] + c * u[1]])
        if np.all(np.abs(obj - cand * BEHIND) <= REACH):
            return cand
    return u


class RandomPlay:
    """Smooth random actions (an OU process, clipped): coverage data with no intent.

    White noise makes the pusher jitter in place; correlated noise makes it wander the table.
    """

    def __init__(self, action_dim: int, rng: np.random.Generator | None = None, correlation: float = 0.8):
        self.action_dim, self.correlation = action_dim, correlation
        self.rng = rng if rng is not None else np.random.default_rng()
        self.reset()

    def reset(self) -> None:
        self._x = self.rng.uniform(-1, 1, self.action_dim)

    def act(self, info: dict) -> np.ndarray:
        c = self.correlation
        self._x = c * self._x + np.sqrt(1 - c * c) * self.rng.standard_normal(self.action_dim)
        return np.clip(self._x, -1.0, 1.0).astype(np.float32)

