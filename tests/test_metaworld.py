"""foresight/MetaWorld-<task>-v0: API, seeding, upright frames, instructions, experts, clear errors."""

import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs  # noqa: F401  (sets MUJOCO_GL before mujoco is imported)
from envs.metaworld import (BUDGETS, INSTRUCTIONS, METAWORLD_TASKS, MetaWorldEnv, MetaWorldExpert,
                            metaworld_id, register_metaworld)
from envs.tasks import check_instruction

TASK = "reach-v3"


@pytest.fixture(scope="module")
def env():
    env = MetaWorldEnv(TASK)
    yield env
    env.close()


def test_registration_is_idempotent_and_does_not_import_metaworld():
    code = ("import sys, gymnasium as gym; from envs.metaworld import register_metaworld as r; "
            "ids = r(); assert r() == ids and all(i in gym.registry for i in ids), ids; "
            "assert 'metaworld' not in sys.modules; print(ids[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "foresight/MetaWorld-reach-v3-v0"
    assert len(METAWORLD_TASKS) >= 10


def test_gymnasium_env_checker_passes(env):
    check_env(env, skip_render_check=True)


def test_observation_layout_matches_the_space(env):
    import mujoco  # only after envs, which picks the headless GL backend

    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    assert obs["pixels"]["corner"].shape == (64, 64, 3) and obs["pixels"]["corner"].dtype == np.uint8
    assert env.action_space.shape == (4,)
    # state = hand xyz and gripper opening, the first four entries of Meta-World's vector.
    np.testing.assert_allclose(obs["state"], info["mw_obs"][:4])
    np.testing.assert_allclose(obs["state"][:3], env.data.body("hand").xpos, atol=1e-6)
    assert info["mw_obs"].shape == (39,) and info["mw_obs"].dtype == np.float32
    assert np.any(info["goal_pos"] != 0), "the goal must be observable to the expert"
    assert info["task"]["family"] == TASK and not info["is_success"]
    # Positions are up to date at reset, so the first frame shows the goal where it is.
    site_xpos = env.data.site_xpos.copy()
    mujoco.mj_forward(env.model, env.data)
    np.testing.assert_array_equal(env.data.site_xpos, site_xpos)
    obs, reward, terminated, truncated, info = env.step(np.zeros(4, np.float32))
    assert env.observation_space.contains(obs) and reward == 0.0 and not terminated


def _rollout(env, seed, actions):
    obs, info = env.reset(seed=seed)
    frames = [obs["pixels"]["corner"]]
    for a in actions:
        obs, *_ = env.step(a)
        frames.append(obs["pixels"]["corner"])
    return info, np.stack(frames), obs["state"]


def test_same_seed_same_scene_instruction_and_frames_whatever_came_before(env):
    actions = np.random.default_rng(0).uniform(-1, 1, (5, 4))
    info_a, frames_a, state_a = _rollout(env, 7, actions)
    _rollout(env, 3, actions[::-1])  # some other history in between
    info_b, frames_b, state_b = _rollout(env, 7, actions)
    assert info_a["instruction"] == info_b["instruction"]
    np.testing.assert_array_equal(info_a["mw_obs"], info_b["mw_obs"])
    np.testing.assert_array_equal(frames_a, frames_b)
    np.testing.assert_array_equal(state_a, state_b)
    info_c, frames_c, _ = _rollout(env, 8, actions[:0])
    assert not np.allclose(info_a["goal_pos"], info_c["goal_pos"])
    assert not np.array_equal(frames_a[0], frames_c[0])


def test_reset_leaves_the_global_numpy_rng_alone(env):
    before = np.random.get_state()[1].copy()
    env.reset(seed=5)
    np.testing.assert_array_equal(np.random.get_state()[1], before)


def test_frames_are_meta_worlds_own_render_turned_upright(env):
    """Meta-World's corner camera hangs upside down: our frame is its own render turned 180 degrees."""
    from gymnasium.envs.mujoco.mujoco_rendering import MujocoRenderer

    obs, _ = env.reset(seed=2)
    theirs = MujocoRenderer(env.model, env.data, width=64, height=64, camera_name="corner")
    try:
        raw = theirs.render("rgb_array").astype(int)
    finally:
        theirs.close()
    ours = obs["pixels"]["corner"].astype(int)
    assert np.abs(ours - raw[::-1, ::-1]).mean() < 0.2 * np.abs(ours - raw).mean()


def test_instruction_option_and_heldout_split(env):
    _, info = env.reset(seed=4)
    obs, info2 = env.reset(seed=4, options={"instruction": "touch the green ball"})
    assert obs["instruction"] == info2["instruction"] == "touch the green ball"
    np.testing.assert_array_equal(info["mw_obs"], info2["mw_obs"])  # same scene, new text
    train = {env.reset(seed=s)[0]["instruction"] for s in range(12)}
    heldout = {env.reset(seed=s, options={"instruction_split": "heldout"})[0]["instruction"] for s in range(12)}
    assert train <= set(INSTRUCTIONS[TASK]["train"]) and len(train) > 1
    assert heldout <= set(INSTRUCTIONS[TASK]["heldout"]) and len(heldout) > 1


def test_every_task_has_valid_disjoint_paraphrases_and_a_budget():
    assert set(BUDGETS) == set(METAWORLD_TASKS) and max(BUDGETS.values()) <= 500
    for task in METAWORLD_TASKS:
        train, heldout = INSTRUCTIONS[task]["train"], INSTRUCTIONS[task]["heldout"]
        assert len(train) >= 4 and len(heldout) >= 2 and not set(train) & set(heldout)
        for text in train + heldout:
            check_instruction(text)


def test_bad_arguments_raise_clear_errors(env):
    with pytest.raises(ValueError, match="corner"):
        MetaWorldEnv(TASK, cameras=("front",))
    with pytest.raises(ValueError, match="reach-v3"):
        MetaWorldEnv("reach")
    with pytest.raises(ValueError, match="max_steps"):
        MetaWorldEnv(TASK, max_steps=501)
    with pytest.raises(ValueError, match="instruction_split"):
        env.reset(seed=0, options={"task": "push-v3"})
    with pytest.raises(ValueError, match="characters"):
        env.reset(seed=0, options={"instruction": "open the door \u2603"})
    env.reset(seed=0)
    with pytest.raises(ValueError, match="4 finite"):
        env.step(np.zeros(2))
    with pytest.raises(ValueError, match="push-v3"):
        MetaWorldExpert("push-v3").act(env.privileged_info())


def test_gym_make_truncates_at_max_steps_and_renders():
    register_metaworld()
    env = gym.make(metaworld_id(TASK), max_steps=3, render_mode="rgb_array", render_size=96)
    env.reset(seed=0)
    assert env.render().shape == (96, 96, 3)
    flags = [env.step(np.zeros(4, np.float32))[3] for _ in range(3)]
    assert flags == [False, False, True]
    env.close()


@pytest.mark.parametrize("task", ["reach-v3", "button-press-topdown-v3"])
def test_expert_solves_the_task(task):
    env, expert = MetaWorldEnv(task, image_size=16), MetaWorldExpert(task)
    solved = 0
    for seed in range(4):
        obs, info = env.reset(seed=seed)
        expert.reset()
        terminated = truncated = False
        while not (terminated or truncated):
            obs, reward, terminated, truncated, info = env.step(expert.act(info))
        solved += terminated and info["is_success"] and reward == 1.0
    env.close()
    assert solved >= 3, f"the {task} expert solved {solved}/4"
