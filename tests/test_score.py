"""foresight-score: offline scoring of trajectories, its metrics and its candidates file."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from scipy.stats import spearmanr

from experiments.score import ranking_metrics, run, score_observations
from planner import CostConfig, Goal

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "score.yaml"


def config(tmp_path, checkpoints, **overrides):
    cfg = OmegaConf.load(CONFIG)
    cfg.pop("hydra")
    # the tiny set has the planner's world model and a goal model, no scoring world model or done model
    return OmegaConf.merge(cfg, {"checkpoints": str(checkpoints), "world_model": "world_model", "goal": "model",
                                 "threads": 1, "bootstrap": 50,
                                 "out": str(tmp_path / "scores.csv"), **overrides})


def test_ranking_metrics_on_cases_with_known_answers():
    rng = np.random.default_rng(0)
    y = np.array([0, 0, 1, 1], bool)
    m = ranking_metrics(np.array([0.1, 0.4, 0.35, 0.8]), y, rng, 200)
    assert m["auroc"] == pytest.approx(0.75)  # 3 of the 4 (success, failure) pairs ordered right
    assert m["spearman"] == pytest.approx(spearmanr([0.1, 0.4, 0.35, 0.8], y).statistic)
    assert 0.0 <= m["auroc_ci95"][0] <= m["auroc_ci95"][1] <= 1.0
    assert ranking_metrics(np.arange(4.0), y, rng)["auroc"] == 1.0
    assert ranking_metrics(-np.arange(4.0), y, rng)["auroc"] == 0.0
    assert ranking_metrics(np.ones(4), y, rng)["auroc"] == 0.5  # ties count half
    assert np.isnan(ranking_metrics(np.arange(4.0), np.ones(4, bool), rng)["auroc"])  # one class: undefined


class PointWorld:
    """A stand-in world model whose latent is a point moved by the summed actions of each chunk."""

    cfg = type("cfg", (), {"history": 1})

    def encode(self, pixels, state):
        return torch.zeros(len(pixels), pixels.shape[1], 2)

    def rollout(self, z_hist, chunks, lang):
        return z_hist[:, -1:] + chunks.sum(2).cumsum(1)


class FixedGoal:
    def predict(self, lang, z_now):
        return torch.tensor([[2.0, 0.0]]), torch.zeros(1, 2)


def test_candidates_are_ranked_by_their_imagined_end_state_not_their_path():
    right, left, up = [1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]
    plans = torch.tensor([[[right], [right]],       # straight to the goal (2, 0)
                          [[up], [left]],           # wanders to (-1, 1)
                          [[left], [right]],        # comes back to the start (0, 0)
                          [[up], [[2.0, -1.0]]]])   # a detour that still ends on the goal
    out = score_observations(PointWorld(), FixedGoal(), np.zeros((1, 1, 1, 4, 4, 3), np.uint8),
                             np.zeros((1, 1, 4), np.float32), torch.zeros(1, 384), [plans], CostConfig())
    assert out["cost"][0] == pytest.approx([0.0, np.hypot(3, 1), 2.0, 0.0])
    assert out["cost_goal_z0"][0] == pytest.approx([2.0, np.hypot(1, 1), 0.0, 2.0])
    assert out["path_length"][0] == pytest.approx([2.0, 2.0, 2.0, 1 + np.sqrt(5)])
    assert "cost_real_end" not in out  # only with the real frames the actions led to


def test_the_real_end_frame_is_scored_under_the_same_goal_without_imagination():
    class ShiftedWorld(PointWorld):  # the encoder reads the state's first two entries as the point
        def encode(self, pixels, state):
            return state[..., :2]

    state = np.array([[[0.0, 0.0, 0.0, 0.0]], [[2.0, 0.0, 0.0, 0.0]]], np.float32)  # first frames
    end = np.array([[[2.0, 0.0, 0.0, 0.0]], [[5.0, 4.0, 0.0, 0.0]]], np.float32)  # where each episode ended
    pixels = np.zeros((2, 1, 1, 4, 4, 3), np.uint8)
    plans = [torch.zeros(1, 1, 1, 2)] * 2  # resting plans: imagination ends where it started
    out = score_observations(ShiftedWorld(), FixedGoal(), pixels, state, torch.zeros(2, 384), plans, CostConfig(),
                             real_end=(pixels, end))
    assert [c[0] for c in out["cost"]] == pytest.approx([2.0, 0.0])
    assert [c[0] for c in out["cost_real_end"]] == pytest.approx([0.0, 5.0])  # |(2,0)-(2,0)|, |(5,4)-(2,0)|


def test_dataset_mode_writes_one_row_per_episode_with_finite_costs(tmp_path, tiny_dataset, tiny_checkpoints):
    results, path = run(config(tmp_path, tiny_checkpoints, data=str(tiny_dataset)))
    rows = pd.read_csv(tmp_path / "scores.csv")
    assert len(rows) == 10 and list(rows.episode) == list(range(10))
    assert np.isfinite(rows[["cost", "cost_goal_z0", "path_length", "cost_real_end"]].to_numpy()).all()
    assert (rows.horizon == 10).all()  # the 80-step budget of both families in chunks of 8, for every episode
    assert (rows.padded == 80 - np.minimum(rows.length, 80)).all()
    assert path == tmp_path / "results.json" and results["skipped"] == 0
    m = results["metrics"]["cost"]
    assert m["n"] == 10 and m["successes"] == rows.success.sum()
    fewer = run(config(tmp_path / "f", tiny_checkpoints, data=str(tiny_dataset), families=["push_to_pad"],
                       horizon=2, pad="skip", out=str(tmp_path / "f" / "scores.parquet")))[0]
    picked = pd.read_parquet(tmp_path / "f" / "scores.parquet")
    assert set(picked.family) == {"push_to_pad"} and (picked.horizon == 2).all() and (picked.length >= 16).all()
    assert len(picked) + fewer["skipped"] == 6  # seeds 0, 1, 4, 5, 8, 9


def candidates_file(path, n=2, m=5, horizon=2, chunk=8, size=32, seed=0, **replace):
    rng = np.random.default_rng(seed)
    cand = rng.uniform(-1, 1, (n, m, horizon, chunk, 2)).astype(np.float32)
    cand[:, -1] = cand[:, 0]  # a duplicate must cost the same and tie in rank
    data = {"pixels": rng.integers(0, 256, (n, 1, size, size, 3), dtype=np.uint8),
            "state": rng.normal(size=(n, 4)).astype(np.float32),
            "instructions": np.array(["push the red cube onto the green pad"] * n), "candidates": cand,
            "labels": rng.random((n, m)) < 0.5, **replace}
    np.savez(path, **data)
    return path


def test_candidates_mode_ranks_within_each_observation(tmp_path, tiny_checkpoints):
    results, _ = run(config(tmp_path, tiny_checkpoints, candidates=str(candidates_file(tmp_path / "c.npz"))))
    rows = pd.read_csv(tmp_path / "scores.csv")
    assert len(rows) == 10 and np.isfinite(rows.cost).all()
    for _, obs in rows.groupby("observation"):
        by_cost = obs.sort_values("cost")
        assert by_cost["rank"].iloc[0] == 1 and by_cost["rank"].is_monotonic_increasing
        assert obs.cost.iloc[-1] == obs.cost.iloc[0] and obs["rank"].iloc[-1] == obs["rank"].iloc[0]
    assert results["metrics"]["cost"]["n"] == 10


@pytest.mark.parametrize("replace, message", [
    ({"candidates": np.zeros((2, 5, 2, 4, 2), np.float32)}, r"candidates has shape \[2, 4, 2\].*\[2, 8, 2\]"),
    ({"pixels": np.zeros((2, 1, 64, 64, 3), np.uint8)}, r"pixels has shape .*resize"),
    ({"labels": np.zeros((2, 3), bool)}, r"labels has shape \[2, 3\], .* \[2, 5\]"),
])
def test_candidates_mode_rejects_a_bad_shape_saying_what_to_fix(tmp_path, tiny_checkpoints, replace, message):
    path = candidates_file(tmp_path / "bad.npz", **replace)
    with pytest.raises(ValueError, match=message):
        run(config(tmp_path, tiny_checkpoints, candidates=str(path)))


def test_the_done_goal_costs_minus_the_log_probability_that_every_clause_holds():
    class LatentMinusClause:  # a stand-in done model: logit = z's first entry - the clause's first entry
        def logit(self, z, lang):
            return z[:, 0] - lang[:, 0]

    goal = Goal.from_done(LatentMinusClause(), torch.tensor([[0.0], [2.0]]))  # two clauses
    z = torch.tensor([[1.0, 5.0], [3.0, -5.0]])
    holds = torch.nn.functional.logsigmoid
    assert torch.allclose(goal.cost(z, "l2"), -(holds(z[:, 0]) + holds(z[:, 0] - 2)))
    assert goal.cost(z, "l2")[1] < goal.cost(z, "l2")[0]  # further past both clauses' bars: cheaper


def test_matched_lengths_cut_each_failure_at_a_success_length_of_its_family_and_the_run_renders_for_the_readme(
        tmp_path, tiny_dataset, tiny_checkpoints):
    """lengths=matched takes the length tell away: a failure's actions stop (and it rests, and its real
    end frame is taken) where a success of its family stopped. foresight-report saves and renders the run."""
    import json

    from experiments.report import main as report, render

    results, _ = run(config(tmp_path, tiny_checkpoints, data=str(tiny_dataset), lengths="matched"))
    rows = pd.read_csv(tmp_path / "scores.csv")
    wins, losses = rows[rows.success], rows[~rows.success]
    assert len(wins) and len(losses) and (wins.length == wins.recorded_length).all()
    for _, r in losses.iterrows():
        assert r.length in set(wins[wins.family == r.family].recorded_length) and r.length <= r.recorded_length
    assert (rows.padded == 80 - rows.length).all()
    report(["--results", str(tmp_path / "results"), "save", "score", str(tmp_path)])
    saved = json.loads((tmp_path / "results" / "score.json").read_text())
    assert saved["kind"] == "score" and saved["metrics"] == results["metrics"]
    assert f"{len(rows)} scored ({len(wins)} successes" in render(saved, "score")
    with pytest.raises(ValueError, match="lengths must be recorded or matched"):
        run(config(tmp_path, tiny_checkpoints, data=str(tiny_dataset), lengths="same"))


def test_the_shipped_scoring_stack_keeps_the_planners_encoder_so_its_done_model_reads_it():
    """foresight-score's default world model is the planner's with another predictor: the same encoder
    (the scoring done model was trained on its latents), a predictor that differs, trained against
    the scoring done model that foresight-score reads."""
    from models import WorldModel
    from models.checkpoint import load_checkpoint

    root = Path(__file__).resolve().parent.parent
    shipped, cfg = root / "checkpoints" / "tabletop", OmegaConf.load(CONFIG)
    planner, scoring = WorldModel.load(shipped / "world_model"), WorldModel.load(shipped / cfg.world_model)
    assert all(torch.equal(p, q) for p, q in zip(planner.encoder.parameters(), scoring.encoder.parameters()))
    assert not torch.equal(planner.predictor.out.weight, scoring.predictor.out.weight)
    done = load_checkpoint(shipped / cfg.done)[1]
    assert done["kind"] == "done" and done["world_model"] == "checkpoints/tabletop/world_model"
    trained = load_checkpoint(shipped / cfg.world_model)[1]["predictor"]["train"]
    assert Path(trained["done"]).name == cfg.done == Path(OmegaConf.load(root / "configs/target/predictor.yaml").done).name
