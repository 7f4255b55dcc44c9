"""Task families, their instructions and their success predicates.

Everything here is pure numpy on planar positions, so it is easy to test without a simulator.
A task is a sequence of subgoals; single-step families have one, `two_step` has two that must be
met in order and then hold together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scene import COLOURS, OBJECT_HALF, PAD_RADIUS, PUSHER_RADIUS, SHAPES, TABLE_HALF

FAMILIES = ("reach", "push_to_pad", "push_to_region", "two_step")
INSTRUCTION_SPLITS = ("train", "heldout")

# Step budgets at 10 Hz: roughly twice the clean expert's slowest of 100 episodes
# (measured 15, 48, 45 and 86 steps).
BUDGETS = {"reach": 40, "push_to_pad": 80, "push_to_region": 80, "two_step": 160}

# Regions are axis-aligned boxes (xmin, xmax, ymin, ymax) in table coordinates.
_EDGE = 0.08  # a side region starts this far from the centre line
_H = TABLE_HALF
REGIONS: dict[str, tuple[float, float, float, float]] = {
    "left side": (-_H, -_EDGE, -_H, _H),
    "right side": (_EDGE, _H, -_H, _H),
    "top side": (-_H, _H, _EDGE, _H),
    "bottom side": (-_H, _H, -_H, -_EDGE),
    "top-left corner": (-_H, -_EDGE, _EDGE, _H),
    "top-right corner": (_EDGE, _H, _EDGE, _H),
    "bottom-left corner": (-_H, -_EDGE, -_H, -_EDGE),
    "bottom-right corner": (_EDGE, _H, -_H, -_EDGE),
}
SIDES = ("left side", "right side", "top side", "bottom side")
OPPOSITE = {"left side": "right side", "right side": "left side",
            "top side": "bottom side", "bottom side": "top side"}

# Instruction templates. The last third of each family's list is held out from training.
# Placeholders: {obj}, {pad}, {region}, {obj2}, {region2}.
TEMPLATES: dict[str, dict[str, tuple[str, ...]]] = {
    "reach": {
        "train": ("touch the {obj}", "move to the {obj}", "reach the {obj}",
                  "go and touch the {obj}", "make contact with the {obj}",
                  "put the pusher against the {obj}"),
        "heldout": ("tap the {obj}", "bump gently into the {obj}",
                    "drive up to the {obj} until you touch it"),
    },
    "push_to_pad": {
        "train": ("push the {obj} onto the {pad} pad", "move the {obj} to the {pad} pad",
                  "slide the {obj} onto the {pad} pad", "get the {obj} onto the {pad} pad",
                  "put the {obj} on the {pad} pad", "the {obj} goes on the {pad} pad"),
        "heldout": ("shove the {obj} over to the {pad} pad",
                    "nudge the {obj} until it sits on the {pad} pad",
                    "place the {obj} on top of the {pad} target"),
    },
    "push_to_region": {
        "train": ("push the {obj} into the {region}", "move the {obj} to the {region}",
                  "slide the {obj} to the {region} of the table",
                  "get the {obj} into the {region}", "the {obj} belongs in the {region}",
                  "bring the {obj} over to the {region}"),
        "heldout": ("shove the {obj} toward the {region} and leave it there",
                    "relocate the {obj} to the {region}",
                    "nudge the {obj} all the way into the {region}"),
    },
    "two_step": {
        "train": ("push the {obj} to the {region}, then the {obj2} to the {region2}",
                  "first move the {obj} to the {region}, then move the {obj2} to the {region2}",
                  "slide the {obj} to the {region} and after that the {obj2} to the {region2}",
                  "get the {obj} into the {region}, then get the {obj2} into the {region2}"),
        "heldout": ("begin with the {obj}: push it to the {region}; next, push the {obj2} to "
                    "the {region2}",
                    "once the {obj} is in the {region}, bring the {obj2} to the {region2}"),
    },
}

# Characters an instruction may use (the observation space's Text charset).
COLOURS_ORDER = tuple(COLOURS)

CHARSET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ,.;:'!?-()"
MAX_INSTRUCTION_LENGTH = 256


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Subgoal:
    """One thing to achieve: `kind` is "touch", "pad" (target = pad colour) or "region"."""

    object: int  # index into the scene's objects
    kind: str
    target: str = ""


@dataclass(frozen=True)
class TaskSpec:
    family: str
    objects: tuple[SceneObject, ...]  # the scene's task objects, in slot order
    pads: tuple[str, ...]  # pad colours, in pad-slot order
    subgoals: tuple[Subgoal, ...]
    budget: int

    def fill(self, template: str) -> str:
        """The instruction text for this task from one template."""
        slots = {}
        for suffix, sub in zip(("", "2"), self.subgoals):
            slots["obj" + suffix] = self.objects[sub.object].name
            slots["region" + suffix] = sub.target
            slots["pad" + suffix] = sub.target
        return template.format(**slots)

    def to_dict(self) -> dict:
        """JSON-safe description (for info dicts, datasets and logs)."""
        return {
            "family": self.family,
            "objects": [o.name for o in self.objects],
            "pads": list(self.pads),
            "subgoals": [{"object": self.objects[s.object].name, "kind": s.kind, "target": s.target}
                         for s in self.subgoals],
            "budget": self.budget,
        }

    @property
    def named_colours(self) -> set[str]:
        """Colours the instruction mentions (objects and pads): perturbations must keep them."""
        out = {self.objects[s.object].colour for s in self.subgoals}
        return out | {s.target for s in self.subgoals if s.kind == "pad"}


def in_region(xy: np.ndarray, region: str) -> bool:
    x0, x1, y0, y1 = REGIONS[region]
    return bool(x0 <= xy[0] <= x1 and y0 <= xy[1] <= y1)


def distance_to_region(xy: np.ndarray, region: str) -> float:
    x0, x1, y0, y1 = REGIONS[region]
    dx = max(x0 - xy[0], 0.0, xy[0] - x1)
    dy = max(y0 - xy[1], 0.0, xy[1] - y1)
    return float(np.hypot(dx, dy))


TOUCH_DISTANCE = PUSHER_RADIUS + OBJECT_HALF + 0.01  # centre distance that counts as a touch


def subgoal_met(sub: Subgoal, object_xy: np.ndarray, pusher_xy: np.ndarray,
                pad_xy: dict[str, np.ndarray]) -> bool:
    """Whether one subgoal holds in the true state (planar positions, metres)."""
    obj = object_xy[sub.object]
    if sub.kind == "touch":
        return bool(np.linalg.norm(obj - pusher_xy) <= TOUCH_DISTANCE)
    if sub.kind == "pad":
        return bool(np.linalg.norm(obj - pad_xy[sub.target]) <= PAD_RADIUS)
    if sub.kind == "region":
        return in_region(obj, sub.target)
    raise ValueError(f"unknown subgoal kind {sub.kind!r}; expected touch, pad or region")


def advance(stage: int, met: list[bool]) -> tuple[int, bool]:
    """Ordered progress over the subgoals' checks `met`: the next subgoal counts once met;
    success is all met, in order, now."""
    while stage < len(met) and met[stage]:
        stage += 1
    return stage, stage == len(met) and all(met)


def validate_choice(kind: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; choose one of {', '.join(map(str, allowed))}")


def sample_task(family: str, rng: np.random.Generator, num_objects: tuple[int, int],
                colours: tuple[str, ...], shapes: tuple[str, ...]
                ) -> tuple[TaskSpec, np.ndarray, np.ndarray, np.ndarray]:
    """Draw a task and its layout: (task, object xy [n,2], pad xy [p,2], pusher xy [2]).

    Objects have distinct colours (so "the red cube" is unambiguous) and start apart from each
    other, from the pads and from the walls; no subgoal holds at the start.
    """
    lo = max(num_objects[0], 2 if family == "two_step" else 1)
    if lo > num_objects[1]:
        raise ValueError(f"task {family!r} needs at least {lo} objects but num_objects allows at "
                         f"most {num_objects[1]}; raise num_objects")
    if len(colours) < lo:
        raise ValueError(f"task {family!r} needs {lo} distinct object colours; got {colours}")
    for _ in range(1000):
        n = int(rng.integers(lo, min(num_objects[1], len(colours)) + 1))
        picked = rng.choice(len(colours), size=n, replace=False)
        objects = tuple(SceneObject(colours[i], shapes[rng.integers(len(shapes))]) for i in picked)
        n_pads = int(rng.integers(1, 4)) if family == "push_to_pad" else 0
        pad_colours = tuple(COLOURS_ORDER[i] for i in rng.choice(len(COLOURS_ORDER), n_pads, replace=False))
        pad_xy = _scatter(rng, n_pads, 0.15, 2 * PAD_RADIUS + 0.02, [])  # clear of corners
        obj_xy = _scatter(rng, n, 0.18, 3.2 * OBJECT_HALF, [(p, PAD_RADIUS + OBJECT_HALF + 0.01) for p in pad_xy])
        if obj_xy is None or pad_xy is None:
            continue
        pusher = _scatter(rng, 1, 0.2, 0.0, [(o, OBJECT_HALF * 1.5 + PUSHER_RADIUS + 0.02) for o in obj_xy])
        if pusher is None:
            continue
        subgoals = _sample_subgoals(family, rng, obj_xy, pad_colours)
        if subgoals is None:
            continue
        task = TaskSpec(family, objects, pad_colours, subgoals, BUDGETS[family])
        return task, obj_xy, pad_xy, pusher[0]
    raise RuntimeError(f"could not lay out a {family!r} task in 1000 tries; "
                       f"reduce num_objects ({num_objects})")


def _scatter(rng, n, half, min_gap, avoid):
    """n points in [-half, half]^2, pairwise >= min_gap apart and clear of (point, radius) pairs."""
    pts: list[np.ndarray] = []
    for _ in range(200 * max(n, 1)):
        if len(pts) == n:
            return np.array(pts).reshape(n, 2)
        p = rng.uniform(-half, half, size=2)
        if all(np.linalg.norm(p - q) >= min_gap for q in pts) and \
                all(np.linalg.norm(p - q) >= r for q, r in avoid):
            pts.append(p)
    return np.array(pts).reshape(n, 2) if len(pts) == n else None


def _sample_subgoals(family, rng, obj_xy, pad_colours):
    n = len(obj_xy)
    target = int(rng.integers(n))
    if family == "reach":
        return (Subgoal(target, "touch"),)
    if family == "push_to_pad":
        return (Subgoal(target, "pad", pad_colours[rng.integers(len(pad_colours))]),)
    if family == "push_to_region":
        # Only regions the object is clearly outside of, so a real push is needed.
        far = [r for r in REGIONS if distance_to_region(obj_xy[target], r) >= 0.05]
        return (Subgoal(target, "region", far[rng.integers(len(far))]),) if far else None
    first, second = (int(i) for i in rng.choice(n, size=2, replace=False))
    side = SIDES[rng.integers(len(SIDES))]
    if distance_to_region(obj_xy[first], side) < 0.05 or \
            distance_to_region(obj_xy[second], OPPOSITE[side]) < 0.05:
        return None
    return (Subgoal(first, "region", side), Subgoal(second, "region", OPPOSITE[side]))


def instruction_for(task: TaskSpec, split: str, rng: np.random.Generator) -> str:
    validate_choice("instruction split", split, INSTRUCTION_SPLITS)
    templates = TEMPLATES[task.family][split]
    return task.fill(templates[rng.integers(len(templates))])


def check_instruction(text) -> str:
    """A user-supplied instruction, or a clear error saying what is wrong with it."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"instruction must be a non-empty string, got {text!r}")
    bad = sorted(set(text) - set(CHARSET))
    if bad:
        raise ValueError(f"instruction {text!r} has characters outside the allowed set: {bad}; "
                         f"use letters, digits, spaces and {CHARSET[62:]!r}")
    if len(text) > MAX_INSTRUCTION_LENGTH:
        raise ValueError(f"instruction is {len(text)} characters; the limit is {MAX_INSTRUCTION_LENGTH}")
    return text


__all__ = ["FAMILIES", "BUDGETS", "REGIONS", "SIDES", "TEMPLATES", "SceneObject", "Subgoal",
           "TaskSpec", "subgoal_met", "advance", "sample_task", "instruction_for", "in_region",
           "check_instruction", "SHAPES"]
