"""foresight/Tabletop-v0: API, seeding, instructions, success predicates and clear errors."""

import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs.scene import COLOURS, OBJECT_HALF, PAD_RADIUS, TABLE_RGB, image_coords
from envs.tasks import (TEMPLATES, TOUCH_DISTANCE, Subgoal, advance,
                        in_region, subgoal_met)


@pytest.fixture
def env():
    env = gym.make(envs.TABLETOP_ID)
    yield env
    env.close()


def test_gymnasium_env_checker_passes(env):
    check_env(env.unwrapped, skip_render_check=True)


def test_observation_layout_matches_the_space(env):
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    assert obs["pixels"]["top"].shape == (64, 64, 3) and obs["pixels"]["top"].dtype == np.uint8
    assert obs["state"].shape == (4,)
    assert info["task"]["family"] in envs.FAMILIES
    assert info["object_pos"].shape == (len(info["object_names"]), 3)
    assert env.action_space.shape == (2,)


def test_cameras_and_image_size_are_configurable():
    env = gym.make(envs.TABLETOP_ID, cameras=("top", "front", "side"), image_size=(48, 80))
    obs, _ = env.reset(seed=1)
    assert set(obs["pixels"]) == {"top", "front", "side"}
    assert all(img.shape == (48, 80, 3) for img in obs["pixels"].values())
    # Different viewpoints see different images of the same scene.
    assert not np.array_equal(obs["pixels"]["top"][:, :48], obs["pixels"]["front"][:, :48])
    env.close()


def _rollout(seed, actions):
    env = gym.make(envs.TABLETOP_ID)
    obs, info = env.reset(seed=seed)
    frames = [obs["pixels"]["top"]]
    for a in actions:
        obs, *_ = env.step(a)
        frames.append(obs["pixels"]["top"])
    env.close()
    return info, np.stack(frames), obs["state"]


def test_same_seed_same_scene_task_instruction_and_frames():
    actions = np.random.default_rng(0).uniform(-1, 1, (8, 2))
    info_a, frames_a, state_a = _rollout(7, actions)
    info_b, frames_b, state_b = _rollout(7, actions)
    assert info_a["instruction"] == info_b["instruction"]
    assert info_a["task"] == info_b["task"]
    np.testing.assert_array_equal(info_a["object_pos"], info_b["object_pos"])
    np.testing.assert_array_equal(frames_a, frames_b)
    np.testing.assert_array_equal(state_a, state_b)
    info_c, frames_c, _ = _rollout(8, actions)
    assert not np.array_equal(frames_a[0], frames_c[0])


def test_every_family_appears_and_objects_have_distinct_colours(env):
    seen = set()
    for seed in range(40):
        _, info = env.reset(seed=seed)
        seen.add(info["task"]["family"])
        colours = [name.split()[0] for name in info["object_names"]]
        assert len(colours) == len(set(colours)), "object colours must be unique in a scene"
        assert 1 <= len(colours) <= 4
        assert not info["is_success"], "no task may start already solved"
    assert seen == set(envs.FAMILIES)


def test_the_camera_tells_every_pad_colour_apart_and_from_the_table():
    env = gym.make(envs.TABLETOP_ID, image_size=64)
    seen = {}
    for seed in range(60):
        obs, info = env.reset(seed=seed)
        img = obs["pixels"]["top"].astype(float)
        uv = image_coords(np.c_[info["pad_pos"], np.zeros(len(info["pad_pos"]))])
        for (u, v), colour in zip(uv, info["task"]["pads"]):
            x, y = np.round((np.array([u, v]) + 1) / 2 * 64 - 0.5).astype(int)
            seen.setdefault(colour, img[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3).mean(0))
    env.close()
    assert set(seen) == set(COLOURS)
    table = np.array(TABLE_RGB) * 255
    for a in seen:
        assert np.linalg.norm(seen[a] - table) > 30, f"the {a} pad is hardly visible on the table"
        for b in seen:
            if a < b:
                gap = np.linalg.norm(seen[a] - seen[b])
                assert gap > 30, f"{a} and {b} pads render {gap:.0f} levels apart: {seen[a]}, {seen[b]}"


def test_instruction_splits_use_disjoint_paraphrases(env):
    for family in envs.FAMILIES:
        assert not set(TEMPLATES[family]["train"]) & set(TEMPLATES[family]["heldout"])
        for split in ("train", "heldout"):
            _, info = env.reset(seed=3, options={"task": family, "instruction_split": split})
            task = env.unwrapped.task
            assert info["instruction"] in {task.fill(t) for t in TEMPLATES[family][split]}


def test_instruction_option_replaces_text_but_keeps_task(env):
    _, plain = env.reset(seed=5)
    obs, custom = env.reset(seed=5, options={"instruction": "please tidy up the red thing"})
    assert obs["instruction"] == "please tidy up the red thing"
    assert custom["task"] == plain["task"]
    np.testing.assert_array_equal(custom["object_pos"], plain["object_pos"])


def test_success_predicates_on_true_state():
    objects = np.array([[0.0, 0.0], [0.1, 0.1]])
    pads = {"green": np.array([0.15, -0.15])}
    touch = Subgoal(0, "touch")
    assert subgoal_met(touch, objects, np.array([TOUCH_DISTANCE - 1e-3, 0.0]), pads)
    assert not subgoal_met(touch, objects, np.array([TOUCH_DISTANCE + 1e-3, 0.0]), pads)
    pad = Subgoal(0, "pad", "green")
    assert subgoal_met(pad, np.array([[0.15 + PAD_RADIUS - 1e-3, -0.15]]), np.zeros(2), pads)
    assert not subgoal_met(pad, np.array([[0.15 + PAD_RADIUS + 1e-3, -0.15]]), np.zeros(2), pads)
    assert in_region(np.array([-0.2, 0.2]), "top-left corner")
    assert not in_region(np.array([0.2, 0.2]), "top-left corner")
    assert in_region(np.array([-0.2, -0.2]), "left side") and not in_region(np.array([0.0, 0.0]), "left side")


def test_two_step_needs_order_and_both_at_the_end():
    assert advance(0, [False, True]) == (0, False)  # second first does not count
    assert advance(0, [True, False]) == (1, False)
    assert advance(1, [False, True]) == (2, False)  # first slipped out again
    assert advance(2, [True, True]) == (2, True)


def test_pushing_the_object_onto_its_pad_succeeds_in_sim(env):
    _, info = env.reset(seed=11, options={"task": "push_to_pad"})
    base = env.unwrapped
    sub = base.task.subgoals[0]
    pad_xy = info["pad_pos"][base.task.pads.index(sub.target)]
    base.place_object(base.active[sub.object], pad_xy)
    _, reward, terminated, truncated, info = env.step(np.zeros(2))
    assert terminated and not truncated and reward == 1.0 and info["is_success"]


def test_episode_truncates_at_the_task_budget(env):
    env.reset(seed=2, options={"task": "push_to_region"})
    budget = env.unwrapped.task.budget
    for step in range(1, budget + 1):
        _, _, terminated, truncated, _ = env.step(np.zeros(2))
        assert not terminated
        assert truncated == (step == budget)


def test_objects_rest_on_the_table_and_stay_put(env):
    _, info = env.reset(seed=4)
    start = info["object_pos"]
    for _ in range(30):
        _, _, _, _, info = env.step(np.zeros(2))
    np.testing.assert_allclose(info["object_pos"][:, 2], OBJECT_HALF, atol=2e-3)
    assert np.abs(info["object_pos"] - start).max() < 1e-3


def test_the_pusher_moves_where_it_is_told(env):
    obs, _ = env.reset(seed=0, options={"task": "reach"})
    x0 = obs["state"][0]
    for _ in range(3):
        obs, *_ = env.step(np.array([1.0, 0.0]) if x0 < 0 else np.array([-1.0, 0.0]))
    moved = obs["state"][0] - x0
    assert abs(moved) > 0.05 and np.sign(moved) == (1 if x0 < 0 else -1)


@pytest.mark.parametrize("kwargs, message", [
    ({"tasks": ("juggle",)}, "unknown task 'juggle'"),
    ({"colours": ("red", "mauve")}, "unknown colour 'mauve'"),
    ({"cameras": ("ceiling",)}, "unknown camera 'ceiling'"),
    ({"image_size": 3}, "image size"),
    ({"image_size": (64, 64, 3)}, "image size"),
    ({"num_objects": (0, 9)}, "num_objects"),
    ({"instruction_split": "test"}, "unknown instruction split"),
])
def test_bad_constructor_arguments_say_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message):
        envs.TabletopEnv(**kwargs)


@pytest.mark.parametrize("options, message", [
    ({"task": "juggle"}, "unknown task 'juggle'; choose one of reach"),
    ({"colour": "red"}, "unknown reset option"),
    ({"instruction": ""}, "non-empty string"),
    ({"instruction": "push the cube → left"}, "outside the allowed set"),
    ({"instruction_split": "test"}, "unknown instruction split"),
])
def test_bad_reset_options_say_what_is_wrong(env, options, message):
    with pytest.raises(ValueError, match=message):
        env.reset(seed=0, options=options)


def test_bad_actions_are_rejected(env):
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action must be 2 finite numbers"):
        env.step(np.array([np.nan, 0.0]))
    with pytest.raises(ValueError, match="action must be 2 finite numbers"):
        env.step(np.zeros(3))


def test_envs_never_imports_torch():
    code = "import sys, envs; envs.make_env().reset(seed=0); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
