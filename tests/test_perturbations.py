"""Perturbation wrappers: each axis changes what the cameras see, never the task."""

import math

import gymnasium as gym
import numpy as np
import pytest

import envs
from envs.perturbations import AXES, PERTURBATIONS, apply_perturbations
from envs.scene import CAMERAS, COLOURS, OBJECT_HALF, pad_rgb
from envs.tasks import subgoal_met

STRENGTH = 0.8
SEED = 3
STEPS = 16  # one past displace's latest trigger step
PAD_TASK = {"task": "push_to_pad"}  # pads named in the instruction, and unnamed objects


ENV_KWARGS = {"num_objects": (3, 4), "image_size": 32, "cameras": ("top", "front")}


@pytest.fixture
def make_env():
    """Fresh envs (perturbations edit their model for good), closed after the test."""
    made = []

    def make(**kwargs):
        made.append(gym.make(envs.TABLETOP_ID, **{**ENV_KWARGS, **kwargs}))
        return made[-1]

    yield make
    for env in made:
        env.close()


@pytest.fixture(scope="module")
def plain():
    """Cached unperturbed rollouts, from one env that no perturbation ever edits."""
    env = gym.make(envs.TABLETOP_ID, **ENV_KWARGS)
    cache = {}

    def plain_rollout(seed=SEED, options=PAD_TASK):
        key = (seed, tuple(sorted((options or {}).items())))
        if key not in cache:
            cache[key] = rollout(env, seed, options=options)
        return cache[key]

    plain_rollout.env = env
    yield plain_rollout
    env.close()


def rollout(env, seed=SEED, steps=STEPS, options=PAD_TASK):
    """[(obs, info)] of a reset and `steps` zero actions (the pusher stays put)."""
    obs, info = env.reset(seed=seed, options=options)
    out = [(obs, info)]
    for _ in range(steps):
        obs, _, _, _, info = env.step(np.zeros(2, np.float32))
        out.append((obs, info))
    return out


def same_pixels(a, b):
    return all(np.array_equal(a["pixels"][c], b["pixels"][c]) for c in a["pixels"])


def wrapper(env, cls):
    while not isinstance(env, cls):
        env = env.env
    return env


@pytest.mark.parametrize("axis", AXES)
def test_axis_changes_pixels_but_not_the_task(make_env, plain, axis):
    plain = plain()
    env = apply_perturbations(make_env(), {axis: STRENGTH}, seed=0)
    perturbed = rollout(env)

    for (p_obs, p_info), (q_obs, q_info) in zip(plain, perturbed):
        assert q_obs["instruction"] == p_obs["instruction"]
        assert q_info["task"] == p_info["task"]
        assert q_info["perturbations"] == {axis: STRENGTH}
        if axis != "noise":
            np.testing.assert_array_equal(q_obs["state"], p_obs["state"])
    if axis == "noise":
        assert not any(np.array_equal(p[0]["state"], q[0]["state"]) for p, q in zip(plain, perturbed))
    if axis == "displace":
        t = perturbed[-1][1]["displaced_at"]
        assert t is not None
        assert all(same_pixels(p[0], q[0]) for p, q in zip(plain[:t], perturbed[:t]))
        assert not same_pixels(plain[t][0], perturbed[t][0])
    else:
        assert not any(same_pixels(p[0], q[0]) for p, q in zip(plain, perturbed))

    # The colours the instruction names are untouched, on objects and on pads.
    base = env.unwrapped
    named = base.task.named_colours
    assert any(o.colour not in named for o in base.objects), "the test scene needs an unnamed object"
    for slot, obj in zip(base.active, base.objects):
        if obj.colour in named:
            rgba = base.model.geom_rgba[base.index.object_geoms[slot][obj.shape]]
            np.testing.assert_allclose(rgba, (*COLOURS[obj.colour], 1.0), atol=1e-6)
    for colour, geom in zip(base.task.pads, base.index.pad_geoms):
        if colour in named:
            np.testing.assert_allclose(base.model.geom_rgba[geom, :3], pad_rgb(colour), atol=1e-6)


@pytest.mark.parametrize("axis", AXES)
def test_strength_zero_changes_nothing(plain, axis):
    env = plain.env  # safe to reuse: at strength 0 a wrapper edits nothing
    assert apply_perturbations(env, {axis: 0.0}) is env
    for p, q in zip(plain(), rollout(PERTURBATIONS[axis](env, 0.0))):
        assert same_pixels(p[0], q[0])
        np.testing.assert_array_equal(p[0]["state"], q[0]["state"])


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan, math.inf, "strong", None, True])
def test_bad_strength_is_rejected(plain, bad):
    env = plain.env
    with pytest.raises(ValueError, match=r"lighting strength must be .*\[0, 1\]"):
        apply_perturbations(env, {"lighting": bad})
    with pytest.raises(ValueError, match=r"camera_shake strength must be .*\[0, 1\]"):
        PERTURBATIONS["camera_shake"](env, bad)


def test_unknown_axis_lists_the_valid_ones(plain):
    with pytest.raises(ValueError, match="unknown perturbation axis 'fog'.*valid axes: lighting, table"):
        apply_perturbations(plain.env, {"fog": 0.5, "lighting": 0.5})


def test_all_axes_compose_and_are_deterministic(make_env):
    strengths = {axis: 1.0 for axis in reversed(AXES)}  # dict order must not matter
    env = apply_perturbations(make_env(), strengths, seed=0)
    obs, info = env.reset(seed=1, options={"task": "reach"})  # the shortest budget
    assert list(info["perturbations"]) == list(AXES)
    rng = np.random.default_rng(0)
    done, steps = False, 0
    while not done:  # a whole episode
        obs, reward, terminated, truncated, info = env.step(rng.uniform(-1, 1, 2).astype(np.float32))
        done, steps = terminated or truncated, steps + 1
        assert env.observation_space["pixels"].contains(obs["pixels"])
    assert steps <= info["task"]["budget"]

    # The same seed gives the same frames: again on this env, and on a fresh one.
    first = rollout(env, seed=5, options=None)
    again = rollout(env, seed=5, options=None)
    fresh = rollout(apply_perturbations(make_env(), strengths, seed=123), seed=5, options=None)
    for a, b, c in zip(first, again, fresh):
        assert same_pixels(a[0], b[0]) and same_pixels(a[0], c[0])
        np.testing.assert_array_equal(a[0]["state"], c[0]["state"])


@pytest.mark.parametrize("strength, added", [(0.2, 1), (0.8, 2)])
def test_distractors_add_unnamed_objects(make_env, plain, strength, added):
    env = apply_perturbations(make_env(), {"distractors": strength})
    for seed in range(4):
        _, plain_info = plain.env.reset(seed=seed)
        _, info = env.reset(seed=seed)
        task = env.unwrapped.task
        names = info["object_names"]
        free = [c for c in COLOURS if c not in task.named_colours | {o.colour for o in task.objects}]
        assert len(names) == len(plain_info["object_names"]) + min(added, len(free))
        assert names[:len(task.objects)] == plain_info["object_names"]
        for name in names[len(task.objects):]:
            assert name.split()[0] in free
        xy = info["object_pos"][:, :2]
        gaps = np.linalg.norm(xy[:, None] - xy[None], axis=-1) + np.eye(len(xy))
        assert gaps.min() >= 3 * OBJECT_HALF - 1e-3
        assert info["object_pos"][:, 2].min() > 0  # on the table, not parked below it


@pytest.mark.parametrize("family", ["reach", "push_to_pad", "push_to_region", "two_step"])
def test_displace_moves_the_subgoal_object(make_env, family):
    env = apply_perturbations(make_env(), {"displace": STRENGTH})
    frames = rollout(env, seed=7, options={"task": family})
    t = frames[-1][1]["displaced_at"]
    assert 5 <= t <= 15
    before, after = frames[t - 1][1], frames[t][1]
    task = env.unwrapped.task
    sub = task.subgoals[before["stage"]]
    moved = np.linalg.norm(after["object_pos"][sub.object, :2] - before["object_pos"][sub.object, :2])
    assert moved >= 0.05 + 0.1 * STRENGTH - 1e-3
    pads = dict(zip(task.pads, after["pad_pos"]))
    assert not subgoal_met(sub, after["object_pos"][:, :2], after["pusher_pos"], pads)
    assert all(f[1]["displaced_at"] is None for f in frames[:t])


def test_camera_shake_jitters_around_the_camera_pose_of_the_episode(make_env):
    pose_only = apply_perturbations(make_env(), {"camera_pose": 1.0})
    both = apply_perturbations(make_env(), {"camera_pose": 1.0, "camera_shake": 1.0})
    shake = wrapper(both, PERTURBATIONS["camera_shake"])
    top = both.unwrapped.index.cameras["top"]
    for seed in (0, 1, 0):  # episodes in a row: no drift from one to the next
        pose_only.reset(seed=seed)
        rollout(both, seed=seed, steps=3, options=None)
        expected = pose_only.unwrapped.model.cam_pos[top]
        np.testing.assert_allclose(shake.base_poses[top][0], expected, atol=1e-12)
        shaken = both.unwrapped.model.cam_pos[top]
        assert 0 < np.linalg.norm(shaken - expected) <= 0.015 + 1e-9
        assert np.linalg.norm(expected - CAMERAS["top"][0]) <= 0.06 + 1e-9
