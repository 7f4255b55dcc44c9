"""The planner: CEM, MPPI and nevergrad minimise real objectives within bounds and deadlines,
non-finite costs never win, the objective's terms, and the controller on the MuJoCo tabletop
(every mode, warm start, history spacing, determinism, the VLA fallback, clear errors), and
multi-step instructions planned clause by clause."""

import math
import zlib

import numpy as np
import pytest
import torch

import envs
from envs.tasks import TEMPLATES
from models.done import DoneModel, DoneModelConfig
from models.goal import GoalModel, GoalModelConfig
from models.vla import VLA, VLAConfig
from models.world_model import WorldModel, WorldModelConfig
from planner import (MODES, CostConfig, ForesightController, Goal, NevergradOptimizer, Objective,
                     PlannerConfig, Proposal, SamplerConfig, SamplingOptimizer)
from planner.subgoals import split_instruction

SHAPE = (2, 4, 2)  # H, K, A
TARGET = torch.tensor([0.6, -0.3]).expand(*SHAPE).clone()


def quadratic(candidates: torch.Tensor) -> torch.Tensor:
    return (candidates - TARGET).pow(2).flatten(1).sum(1)


def start() -> Proposal:
    return Proposal(torch.zeros(SHAPE), torch.full(SHAPE, 0.5))


@pytest.mark.parametrize("refit", ["cem", "mppi"])
def test_sampling_optimizer_minimises_within_bounds(refit):
    opt = SamplingOptimizer(SamplerConfig(refit=refit, population=256, iterations=8, elites=16))
    result = opt.optimize(quadratic, start(), torch.Generator().manual_seed(0))
    assert result.actions.shape == SHAPE
    assert result.cost < 0.05 * float(quadratic(torch.zeros(1, *SHAPE))), result.cost
    assert result.cost == pytest.approx(float(quadratic(result.actions[None])))
    assert result.evaluations == 8 * (256 + 1) and result.iterations == 8
    # a target outside the bounds: the plan stops at the bound
    far = SamplingOptimizer(SamplerConfig(refit=refit, iterations=6))
    out = far.optimize(lambda c: (c - 3.0).pow(2).flatten(1).sum(1), start(), torch.Generator().manual_seed(0))
    assert out.candidates.abs().max() <= 1.0 and out.actions.mean() > 0.7


def test_deadline_stops_after_one_iteration_and_returns_the_best_so_far():
    opt = SamplingOptimizer(SamplerConfig(iterations=50, budget_ms=0.0))
    result = opt.optimize(quadratic, start(), torch.Generator().manual_seed(0))
    assert result.iterations == 1
    assert result.cost == pytest.approx(float(quadratic(result.candidates).min()))


def test_fixed_samples_are_evaluated_and_can_win():
    """A proposal (as the VLA gives) that already holds the optimum is returned as is."""
    init = Proposal(torch.zeros(SHAPE), torch.full(SHAPE, 0.5), samples=torch.stack([TARGET, -TARGET]))
    result = SamplingOptimizer(SamplerConfig(iterations=2)).optimize(quadratic, init, torch.Generator().manual_seed(0))
    assert result.cost == 0.0 and torch.equal(result.actions, TARGET)


def test_non_finite_costs_never_win():
    def poisoned(c):
        cost = quadratic(c)
        cost[(c[:, 0, 0, 0] > 0.3)] = float("nan")  # the region around the true optimum is "broken"
        return cost
    result = SamplingOptimizer(SamplerConfig(iterations=4)).optimize(poisoned, start(), torch.Generator().manual_seed(0))
    assert math.isfinite(result.cost) and result.actions[0, 0, 0] <= 0.3
    nothing = SamplingOptimizer(SamplerConfig(iterations=2)).optimize(
        lambda c: torch.full((len(c),), float("inf")), start(), torch.Generator().manual_seed(0))
    assert nothing.cost == math.inf


def test_nevergrad_bridge_improves_on_the_start():
    opt = NevergradOptimizer("CMA", evaluations=512, batch=64)
    result = opt.optimize(quadratic, start(), torch.Generator().manual_seed(0))
    assert result.evaluations == 512 and result.iterations == 8
    assert result.cost < 0.5 * float(quadratic(torch.zeros(1, *SHAPE)))
    assert result.actions.abs().max() <= 1.0
    with pytest.raises(ValueError, match="no optimizer named"):
        NevergradOptimizer("NoSuchOptimizer")


# ---------------------------------------------------------------------------- objective


class Drift:
    """A world model whose latent moves by the chunk's summed actions (D = A = 2)."""

    def rollout(self, z_hist, chunks, lang):
        return z_hist[:, -1:] + chunks.sum(2).cumsum(1)


def test_objective_terms():
    z_hist, lang = torch.zeros(1, 2, 2), torch.zeros(1, 384)
    goal = Goal(latent=torch.tensor([4.0, 0.0]))
    cands = torch.zeros(3, 2, 4, 2)
    cands[1, :, :, 0] = 0.5  # ends at (4, 0): on the goal
    cands[2, 0, :, 0] = 1.0  # gets there after one chunk, then stays
    terminal = Objective(Drift(), z_hist, lang, goal)(cands)
    torch.testing.assert_close(terminal, torch.tensor([4.0, 0.0, 0.0]))
    running = Objective(Drift(), z_hist, lang, goal, CostConfig(running_weight=1.0))(cands)
    torch.testing.assert_close(running, torch.tensor([8.0, 2.0, 0.0]))  # the early arrival is cheaper
    prior = torch.ones(1, 4, 2)
    with_prior = Objective(Drift(), z_hist, lang, goal, CostConfig(prior_weight=2.0), prior=prior)(cands)
    torch.testing.assert_close(with_prior - terminal, torch.tensor([2.0, 1.25, 1.0]))
    critic = Objective(Drift(), z_hist, lang, Goal(critic=lambda z: z[:, 0]))(cands)
    torch.testing.assert_close(critic, torch.tensor([0.0, -4.0, -4.0]))
    with pytest.raises(ValueError, match="exactly one"):
        Goal()
    with pytest.raises(ValueError, match="unknown distance"):
        CostConfig(distance="l3")


def test_nll_distance_weighs_dimensions_by_the_goals_precision():
    """A goal pinned down along x (σ = 0.1) but loose along y (σ = 10): missing by 0.5 in x costs
    more than missing by 3 in y, the opposite of what L2 says."""
    z_hist, lang = torch.zeros(1, 1, 2), torch.zeros(1, 384)
    cands = torch.zeros(2, 1, 1, 2)
    cands[0, 0, 0] = torch.tensor([4.5, 0.0])  # ends 0.5 off in x
    cands[1, 0, 0] = torch.tensor([4.0, 3.0])  # ends 3 off in y
    goal = Goal(latent=torch.tensor([4.0, 0.0]), log_var=torch.tensor([0.1, 10.0]).log() * 2)
    l2 = Objective(Drift(), z_hist, lang, goal)(cands)
    nll = Objective(Drift(), z_hist, lang, goal, CostConfig(distance="nll"))(cands)
    assert l2[0] < l2[1] and nll[0] > nll[1]
    unit = Objective(Drift(), z_hist, lang, Goal(latent=torch.tensor([4.0, 0.0])), CostConfig(distance="nll"))(cands)
    torch.testing.assert_close(unit, torch.tensor([0.125, 4.5]))  # no variance: half the squared L2


def test_the_value_head_learns_how_far_a_state_is_from_done_and_which_states_fail():
    """Steps to success set by the first latent dimension (20 steps per unit), episodes whose second
    dimension is above 0.7 fail: the value head learns γ^steps, steps_to_go inverts it, a failing
    state costs far more than a succeeding one as near done, and a goal=value objective prefers the
    candidate that imagines the state nearest done. (The tolerances cover seeds 0-5: the fit of
    γ^18 ≈ 0.15 moves by a few steps with float rounding, i.e. with the machine.)"""
    torch.manual_seed(0)
    model = GoalModel(GoalModelConfig(latent_dim=2, width=32, critic_dim=4, value=True, discount=0.9))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    lang = torch.randn(1, 384).expand(128, -1)
    for _ in range(1500):
        z_now = torch.rand(128, 2)
        to_go = (20 * z_now[:, 0]).round().long()
        success = z_now[:, 1] < 0.7
        loss = model(lang, torch.zeros(128), z_now, torch.zeros(128, 2), to_go, success)["value"]
        opt.zero_grad(), loss.backward(), opt.step()
    z = torch.tensor([[0.1, 0.3], [0.5, 0.3], [0.9, 0.3], [0.1, 0.95]])
    with torch.no_grad():
        steps = model.steps_to_go(z, lang[:1])
        torch.testing.assert_close(steps[:3], torch.tensor([2.0, 10.0, 18.0]), atol=4.0, rtol=0)
        assert steps[3] > steps[0] + 8  # the same distance, but failing: V under γ^8 ≈ 0.43 of it
        goal = Goal.from_model(model, lang[:1], z[:1], "value")
        cands = torch.zeros(3, 1, 1, 2)
        cands[:, 0, 0, 0] = torch.tensor([0.8, -0.3, 0.2])  # from (0.5, 0.5): ends at x = 1.3, 0.2, 0.7
        costs = Objective(Drift(), torch.full((1, 1, 2), 0.5), lang[:1], goal)(cands)
    assert costs.argmin() == 1 and costs.argmax() == 0


def test_goal_value_needs_a_goal_model_with_the_head(models):
    wm, goal, vla = models
    with pytest.raises(ValueError, match="value head"):
        ForesightController(PlannerConfig(mode="vla_cem", goal="value"), wm, goal, vla, text_encoder=HashText())


def test_the_goal_models_variance_learns_which_dimensions_the_instruction_pins_down():
    """Final latents whose first dimension is set by the instruction and whose second is noise: the
    goal model with `variance` learns a small σ for the first and σ ≈ 1 for the second."""
    torch.manual_seed(0)
    model = GoalModel(GoalModelConfig(latent_dim=2, width=32, critic_dim=4, variance=True))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    # The NLL's steps grow as σ shrinks: without decaying the rate, where training stops (and so
    # the assertion) depends on float rounding, i.e. on the machine.
    decay = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.05, total_iters=600)
    lang = torch.randn(2, 384)
    for _ in range(600):
        which = torch.randint(2, (128,))
        z_final = torch.stack([which.float() * 2 - 1, torch.randn(128)], 1)
        loss = model(lang[which], which, torch.zeros(128, 2), z_final)["goal"]
        opt.zero_grad(), loss.backward(), opt.step(), decay.step()
    with torch.no_grad():
        mean, log_var = model.predict(lang, torch.zeros(2, 2))
    torch.testing.assert_close(mean[:, 0], torch.tensor([-1.0, 1.0]), atol=0.15, rtol=0)
    sigma = (log_var / 2).exp()
    assert (sigma[:, 0] < 0.2).all() and ((sigma[:, 1] > 0.7) & (sigma[:, 1] < 1.4)).all(), sigma


# ---------------------------------------------------------------------------- controller


class HashText:
    """A stand-in instruction encoder (the real one is tested elsewhere): a fixed vector per string."""

    def encode(self, texts):
        return torch.stack([torch.randn(384, generator=torch.Generator().manual_seed(zlib.crc32(t.encode())))
                            for t in texts])


@pytest.fixture(scope="module")
def models():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        wm = WorldModel(WorldModelConfig(image_size=32, latent_dim=16, width=32, blocks=1, cond_dim=16,
                                         keypoints=4)).eval()
        goal = GoalModel(GoalModelConfig(latent_dim=16, width=32, critic_dim=8)).eval()
        vla = VLA(VLAConfig(image_size=32, backbone="cnn", width=32, expert_width=32, expert_blocks=1,
                            flow_steps=2, keypoints=4)).eval()
    return wm, goal, vla


@pytest.fixture(scope="module")
def env():
    env = envs.make_env(image_size=32)
    yield env
    env.close()


def controller(models, **cfg) -> ForesightController:
    small = dict(horizon=2, n_exec=3, vla_samples=4, population=8, iterations=2, elites=2, ng_evaluations=16)
    return ForesightController(PlannerConfig(**{**small, **cfg}), *models, text_encoder=HashText())


def run(env, ctrl, steps: int, seed: int = 0):
    obs, _ = env.reset(seed=envs.EVAL_SEED_START + seed, options={"task": "push_to_pad"})
    ctrl.reset(obs["instruction"], seed=seed)
    actions, plans = [], []
    for _ in range(steps):
        actions.append(ctrl.act(obs))
        plans.append(ctrl.last_plan)
        obs, *_ = env.step(actions[-1])
    return np.stack(actions), plans


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_acts_in_bounds_and_reports_its_plan(models, env, mode):
    ctrl = controller(models, mode=mode)
    actions, plans = run(env, ctrl, 7)
    assert actions.shape == (7, 2) and np.all(np.abs(actions) <= 1.0)
    assert len({id(p) for p in plans}) == 3  # replans at steps 0, 3 and 6 (n_exec = 3)
    plan = plans[-1]
    assert plan.mode == mode and plan.time_ms > 0
    if mode == "vla":
        assert plan.evaluations == 0 and plan.latents is None
    else:
        assert plan.actions.shape == (2, 8, 2) and plan.latents.shape == (2, 16)
        assert math.isfinite(plan.cost) and plan.evaluations >= len(plan.candidates) > 0
        assert plan.cost == pytest.approx(float(plan.costs.min()), rel=1e-4) or plan.iterations > 1
        np.testing.assert_allclose(actions[6], plan.actions.flatten(0, 1)[0].numpy())


def test_same_seed_same_actions(models, env):
    a, _ = run(env, controller(models, mode="vla_mppi"), 6, seed=1)
    b, _ = run(env, controller(models, mode="vla_mppi"), 6, seed=1)
    c, _ = run(env, controller(models, mode="vla_mppi"), 6, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_warm_start_shifts_the_previous_plan(models, env):
    ctrl = controller(models, mode="cem")
    run(env, ctrl, 1)
    plan = ctrl.last_plan.actions.flatten(0, 1)
    shifted = ctrl._warm_start().flatten(0, 1)
    torch.testing.assert_close(shifted[:-3], plan[3:])
    torch.testing.assert_close(shifted[-3:], plan[-1:].expand(3, -1))


def test_history_latents_are_one_chunk_apart(models, env):
    """The predictor was trained on latents one chunk (K frames) apart: the controller feeds it the
    same, repeating the first frame until K frames have passed."""
    wm = models[0]
    ctrl = controller(models, mode="cem")
    obs, _ = env.reset(seed=envs.EVAL_SEED_START, options={"task": "push_to_pad"})
    ctrl.reset(obs["instruction"])
    seen = []
    for _ in range(10):
        ctrl.act(obs)
        seen.append(ctrl._tensors(obs))
        obs, *_ = env.step(np.array([1.0, 0.5]))
    hist = ctrl._history()  # after 10 frames: frames 1 and 9
    want = wm.encode(torch.stack([seen[1][0], seen[9][0]])[None], torch.stack([seen[1][1], seen[9][1]])[None])
    torch.testing.assert_close(hist, want)


def test_non_finite_costs_fall_back_to_the_vla_chunk(models, env, caplog):
    wm, goal, vla = models

    class Broken(torch.nn.Module):
        cfg = wm.cfg

        def encode(self, pixels, state):
            return wm.encode(pixels, state)

        def rollout(self, z_hist, chunks, lang):
            return torch.full((len(z_hist), chunks.shape[1], wm.cfg.latent_dim), float("nan"))

    ctrl = ForesightController(PlannerConfig(mode="vla_cem", horizon=2, n_exec=3, vla_samples=4, population=8,
                                             iterations=1), Broken(), goal, vla, text_encoder=HashText())
    actions, plans = run(env, ctrl, 1)
    assert plans[0].fallback and "non-finite" in plans[0].fallback
    assert "fell back" in caplog.text
    assert np.all(np.isfinite(actions)) and np.all(np.abs(actions) <= 1.0)


def test_clear_errors(models, env):
    wm, goal, vla = models
    with pytest.raises(ValueError, match="unknown planner mode"):
        PlannerConfig(mode="greedy")
    with pytest.raises(ValueError, match="needs a VLA"):
        ForesightController(PlannerConfig(mode="vla_cem"), wm, goal, None, text_encoder=HashText())
    with pytest.raises(ValueError, match="needs a goal model"):
        ForesightController(PlannerConfig(mode="cem"), wm, None, None, text_encoder=HashText())
    ctrl = controller(models, mode="cem")
    obs, _ = env.reset(seed=0)
    with pytest.raises(RuntimeError, match="reset"):
        ctrl.act(obs)
    ctrl.reset("push the red cube onto the blue pad")
    with pytest.raises(ValueError, match="pixels must be uint8"):
        ctrl.act({"pixels": {"top": np.zeros((64, 64, 3), np.uint8)}, "state": obs["state"]})
    with pytest.raises(ValueError, match="goal_obs"):
        controller(models, mode="cem", goal="image").reset("push the red cube")


def test_image_goal_is_the_encoded_goal_observation(models, env):
    """goal=image: the cost is the distance of the imagined end state to the goal image's latent."""
    wm = models[0]
    ctrl = controller(models, mode="cem", goal="image")
    goal_obs, _ = env.reset(seed=5)
    obs, _ = env.reset(seed=6)
    ctrl.reset("push the red cube", goal_obs=goal_obs)
    ctrl.act(obs)
    pixels, state = ctrl._tensors(goal_obs)
    z_goal = wm.encode_target(pixels[None, None], state[None, None])[0, 0]
    torch.testing.assert_close(ctrl._goal_latent, z_goal)
    plan = ctrl.last_plan
    assert plan.cost == pytest.approx(float((plan.latents[-1] - z_goal).norm()), rel=1e-4)


# ---------------------------------------------------------------------------- clause by clause


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_every_two_step_template_splits_into_its_two_clauses_in_order(split):
    """Each clause is an instruction of its own: it names its object and its region, in the order the
    task wants them done; one-step instructions stay whole."""
    slots = dict(obj="red cube", region="left side", obj2="blue sphere", region2="right side", pad="green")
    for template in TEMPLATES["two_step"][split]:
        first, second = split_instruction(template.format(**slots))
        assert "red cube" in first and "left side" in first and "blue" not in first and " it " not in f" {first} "
        assert "blue sphere" in second and "right side" in second and "red" not in second
        assert not first.startswith("the ") and not second.startswith("the ")  # each has its verb
    for family in ("reach", "push_to_pad", "push_to_region"):
        for template in (*TEMPLATES[family]["train"], *TEMPLATES[family]["heldout"]):
            assert split_instruction(template.format(**slots)) == [template.format(**slots)]


def test_a_multi_step_instruction_is_planned_for_the_first_clause_not_yet_done(models, env, monkeypatch):
    """With a done model, the VLA proposes, and the goal aims, for the first clause it does not see
    met; the predictor keeps the whole instruction. Without a done model, the whole instruction."""
    wm, goal_model, vla = models
    done = DoneModel(DoneModelConfig(latent_dim=16, width=8)).eval()
    text = HashText()
    instruction = "push the red cube to the left side, then the blue sphere to the right side"
    first, second = split_instruction(instruction)
    met = {first: False}
    monkeypatch.setattr(done, "done", lambda z, lang: torch.tensor(
        [float(any(met[t] for t in met if torch.equal(lang, text.encode([t]))))]))
    asked = []
    sample = vla.sample_chunks
    monkeypatch.setattr(vla, "sample_chunks", lambda batch, *a: asked.append(batch["lang"]) or sample(batch, *a))
    goals = []
    from_model = Goal.from_model
    monkeypatch.setattr(Goal, "from_model", lambda model, lang, *a: goals.append(lang) or from_model(model, lang, *a))
    ctrl = ForesightController(PlannerConfig(mode="vla_rank", horizon=2, n_exec=3, vla_samples=4), wm, goal_model,
                               vla, text_encoder=text, done_model=done)
    obs, _ = env.reset(seed=0)
    ctrl.reset(instruction)
    for step in range(6):
        met[first] = step >= 3  # the first clause holds from the second replan on
        ctrl.act(obs)
        if step in (0, 3):
            clause = (first, second)[step // 3]
            assert ctrl.last_plan.clause == clause and torch.equal(asked[-1], text.encode([clause]))
            assert torch.equal(goals[-1], text.encode([clause]))
    torch.testing.assert_close(ctrl.lang, text.encode([instruction]))
    plain = ForesightController(PlannerConfig(mode="vla_rank", horizon=2, n_exec=3, vla_samples=4), *models,
                                text_encoder=text)
    plain.reset(instruction)
    plain.act(obs)
    assert plain.last_plan.clause is None and torch.equal(asked[-1], text.encode([instruction]))
