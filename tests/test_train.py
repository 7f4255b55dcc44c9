"""foresight-train: a tiny world model and goal model on real episodes; resume after a kill gives
the same losses; torchrun with 2 processes; the collapse the regulariser prevents."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from envs.dataset import EpisodeDataset
from envs.experts import PUSHER_TOP
from envs.scene import TABLE_RGB, image_coords
from experiments.common import CONFIG_DIR
from experiments.evaluate import evaluate, report
from experiments.targets import (clause_truth, first_of_each_family, make_target, merge_windows, named_point_targets,
                                 random_shift, relabel_subgoals, resting_windows, table_symmetry)
from experiments.train import train
from models import WorldModel, WorldModelConfig
from models.checkpoint import load_checkpoint
from models.done import DoneModel
from models.goal import GoalModel
from models.vla import VLA

COMMON = ["target.batch=8", "target.warmup=2", "log_every=1", "threads=1"]
NO_EXTRA = "target.extra_data=[]"  # the predictor recipe's extra datasets are collected by make train, not here
TINY = [*COMMON, "target.model.latent_dim=16", "target.model.keypoints=4", "target.model.width=32",
        "target.model.blocks=1", "target.model.cond_dim=16", "target.horizon=2", "target.eval_windows=16"]


def config(tmp_path, data, *overrides, tiny=TINY):
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=[f"data={data}", f"eval_data={data}", f"target.out={tmp_path}/out",
                                           *tiny, *overrides])


def metrics(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def losses(path):
    return [(m["step"], m["loss"], m["multistep"]) for m in metrics(path) if "loss" in m]


def test_world_model_trains_evaluates_and_loads(tmp_path, tiny_dataset):
    cfg = config(tmp_path, tiny_dataset, "target.steps=40", "target.eval_every=40", "target.checkpoint_every=20",
                 "target.loss.reconstruct=10", "target.loss.reconstruct_width=16", "target.loss.pads=10")
    final = train(cfg, tmp_path / "run")
    assert {"rollout_h1", "copy_last_h1", "ratio_h2"} <= set(final)
    logged = metrics(tmp_path / "run/metrics.jsonl")
    train_lines = [m for m in logged if "loss" in m]
    assert [m["step"] for m in train_lines] == list(range(1, 41))
    assert {"sigreg", "onestep", "multistep", "inverse", "contrast", "reconstruct", "pads", "latent_std",
            "effective_rank", "lr"} <= set(train_lines[0])
    assert train_lines[-1]["contrast"] < train_lines[0]["contrast"]
    assert train_lines[-1]["reconstruct"] < train_lines[0]["reconstruct"]
    assert np.mean([m["pads"] for m in train_lines[-10:]]) < np.mean([m["pads"] for m in train_lines[:10]])
    assert train_lines[-1]["multistep"] < train_lines[0]["multistep"]
    model = WorldModel.load(tmp_path / "out")
    assert model.cfg.image_size == 32 and model.cfg.latent_dim == 16
    z = model.encode(torch.zeros(1, 2, 1, 32, 32, 3, dtype=torch.uint8), torch.zeros(1, 2, 4))
    assert model.rollout(z, torch.zeros(1, 3, 8, 2), torch.zeros(1, 384)).shape == (1, 3, 16)


def test_goal_model_with_a_value_head_and_the_done_model_train_on_the_frozen_world_model(tmp_path, tiny_dataset):
    """The goal and critic learn from the successful episodes, the value head from all of them (the
    random-play ones fail), the done model from relabelled frames of all of them; foresight-evaluate
    reports the goal and value."""
    train(config(tmp_path / "wm", tiny_dataset, "target.steps=5"), tmp_path / "wm_run")
    cfg = config(tmp_path, tiny_dataset, "target=goal", f"world_model={tmp_path}/wm/out", "target.steps=30",
                 "target.model.width=32", "+target.model.value=true", tiny=COMMON)
    final = train(cfg, tmp_path / "run")
    assert 0 <= final["retrieval_pairwise"] <= 1 and 2 <= final["episodes"] < 10  # successful ones only
    assert 0 <= final["value_auroc_last"] <= 1 and final["to_go_mae_steps"] >= 0
    goal = GoalModel.load(tmp_path / "out")
    assert goal.goal(torch.zeros(2, 384), torch.zeros(2, 16)).shape == (2, 16)
    assert 0 < goal.value(torch.zeros(2, 16), torch.zeros(1, 384)).min() < 1

    cfg = config(tmp_path / "done", tiny_dataset, "target=done", f"world_model={tmp_path}/wm/out", "target.steps=40",
                 "target.model.width=32", "target.examples=600", "target.eval_examples=300", "target.eval_every=40",
                 tiny=COMMON)
    final = train(cfg, tmp_path / "done_run")
    assert 0 < final["done_positive_region"] < 1 and 0 <= final["done_accuracy_pad"] <= 1
    logged = [m["loss"] for m in metrics(tmp_path / "done_run/metrics.jsonl") if "loss" in m]
    assert np.mean(logged[-10:]) < np.mean(logged[:10])
    done = DoneModel.load(tmp_path / "done/out")
    assert done.done(torch.zeros(3, 16), torch.zeros(1, 384)).shape == (3,)

    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        ecfg = compose("evaluate", overrides=[f"world_model={tmp_path}/wm/out", f"goal={tmp_path}/out",
                                              f"data={tiny_dataset}", f"eval_data={tiny_dataset}", "max_horizon=2",
                                              "windows=16", "probe_frames=200", "threads=1"])
    results = evaluate(ecfg)
    assert [r["horizon"] for r in results["rollout"]] == [1, 2]
    assert [r["horizon"] for r in results["probe"]["imagined"]] == [1, 2]
    assert 0 < results["probe"]["mean_error_m"] < 0.5 and 0 <= results["goal"]["retrieval_top1"] <= 1
    assert 0 <= results["goal"]["value_auroc_first"] <= 1 and results["probe"]["pads"]["mean_position_error_m"] > 0
    assert "goal retrieval" in report(results)


def test_the_predictor_fine_tunes_for_long_rollouts_that_rest_after_the_episode_and_keeps_the_encoder(
        tmp_path, tiny_dataset):
    train(config(tmp_path / "wm", tiny_dataset, "target.steps=5"), tmp_path / "wm_run")
    cfg = config(tmp_path / "long", tiny_dataset, "target=predictor", f"world_model={tmp_path}/wm/out",
                 f"target.extra_data=[{tiny_dataset}]",  # half the windows from a second dataset (here a copy)
                 "target.steps=60", "target.lr=3e-3", "target.horizon=12", "target.eval_every=60", "target.eval_windows=64",
                 "target.start_share=0.5", "target.done=null", "target.done_weight=0", tiny=COMMON)
    first = make_target(cfg)
    b = first.batch(np.random.default_rng(0), 64)
    assert b["z"].shape == (64, 2 + 12, 16) and b["actions"].shape == (64, 12, 8, 2) and "clauses" not in b
    # 12 chunks run past every tiny episode's end (80 steps at most): the pusher rests there, the scene holds
    assert (b["actions"][:, -1] == 0).all() and torch.equal(b["z"][:, -1], b["z"][:, -2])
    # about half the windows start at their episode's first frame: their history is that frame twice
    ds, (z, *_) = first.train_sets[0]
    starts = [int((z[ds.starts] == z0).all(1).any()) for z0 in b["z"][:, 0]]
    assert 16 < sum(starts) < 48
    final = train(cfg, tmp_path / "long_run")
    logged = [m["loss"] for m in metrics(tmp_path / "long_run/metrics.jsonl") if "loss" in m]
    assert np.mean(logged[-10:]) < np.mean(logged[:10]) and final["ratio_h12"] > 0
    before, after = WorldModel.load(tmp_path / "wm/out"), WorldModel.load(tmp_path / "long/out")
    assert all(torch.equal(p, q) for p, q in zip(before.encoder.parameters(), after.encoder.parameters()))
    assert not torch.equal(before.predictor.out.weight, after.predictor.out.weight)
    assert load_checkpoint(tmp_path / "long/out")[1]["predictor"]["train"]["horizon"] == 12


def test_windows_of_datasets_with_different_clause_counts_merge_with_the_missing_clauses_masked():
    """target.extra_data: one-step windows (one clause) beside two-step ones (two) make one batch; the
    one-step windows' second clause is zero and masked out, so the done term never reads it."""
    def part(size, clauses):
        return {"z": torch.randn(size, 5, 4), "lang": torch.randn(size, 3), "clauses": torch.randn(size, clauses, 3),
                "clause_mask": torch.ones(size, clauses), "clause_truth": torch.ones(size, 3, clauses)}

    one, two = part(2, 1), part(3, 2)
    b = merge_windows([one, two])
    assert b["z"].shape == (5, 5, 4) and b["clauses"].shape == (5, 2, 3) and b["clause_truth"].shape == (5, 3, 2)
    assert torch.equal(b["clause_mask"][:2], torch.tensor([[1.0, 0.0]] * 2)) and b["clause_mask"][2:].all()
    assert torch.equal(b["clauses"][:2, :1], one["clauses"]) and not b["clauses"][:2, 1].any()
    assert torch.equal(b["clause_truth"][2:], two["clause_truth"]) and not b["clause_truth"][:2, :, 1].any()


def test_the_predictor_target_can_train_a_larger_predictor_afresh_on_the_same_encoder(tmp_path, tiny_dataset):
    """target.predictor resizes the predictor: the encoder is copied, the predictor is new and trains,
    and the saved config builds the new size."""
    train(config(tmp_path / "wm", tiny_dataset, "target.steps=5"), tmp_path / "wm_run")
    cfg = config(tmp_path / "wide", tiny_dataset, "target=predictor", f"world_model={tmp_path}/wm/out", NO_EXTRA,
                 "target.predictor={width: 48, blocks: 2, mlp_ratio: 2}", "target.steps=30", "target.lr=3e-3",
                 "target.horizon=4", "target.eval_every=30", "target.eval_windows=32", "target.done=null",
                 "target.done_weight=0", tiny=COMMON)
    train(cfg, tmp_path / "wide_run")
    logged = [m["loss"] for m in metrics(tmp_path / "wide_run/metrics.jsonl") if "loss" in m]
    assert np.mean(logged[-5:]) < np.mean(logged[:5])
    before, after = WorldModel.load(tmp_path / "wm/out"), WorldModel.load(tmp_path / "wide/out")
    assert (after.cfg.width, after.cfg.blocks, after.cfg.mlp_ratio) == (48, 2, 2) and before.cfg.width == 32
    assert all(torch.equal(p, q) for p, q in zip(before.encoder.parameters(), after.encoder.parameters()))
    with pytest.raises(ValueError, match="not \\['latent_dim'\\]"):
        make_target(config(tmp_path / "x", tiny_dataset, "target=predictor", f"world_model={tmp_path}/wm/out", NO_EXTRA,
                           "target.predictor={latent_dim: 8}", "target.done=null", "target.done_weight=0", tiny=COMMON))


@pytest.mark.parametrize("done_target", ["reading", "truth"])
def test_the_done_term_brings_the_done_models_reading_of_imagined_latents_to_that_of_real_ones(
        tmp_path, tiny_dataset, done_target):
    """With a done model (frozen), the predictor's windows carry their instruction's clauses (and,
    for done_target=truth, whether each holds after each chunk), and a heavily weighted done term
    narrows the gap between its reading of the imagined end latent and what it is trained to match (its
    reading of the real one, or the truth) on held-out windows."""
    train(config(tmp_path / "wm", tiny_dataset, "target.steps=5"), tmp_path / "wm_run")
    train(config(tmp_path / "done", tiny_dataset, "target=done", f"world_model={tmp_path}/wm/out", "target.steps=40",
                 "target.model.width=32", "target.examples=600", "target.eval_examples=300", "target.eval_every=40",
                 tiny=COMMON), tmp_path / "done_run")

    def run(weight):
        cfg = config(tmp_path / f"long{weight}", tiny_dataset, "target=predictor", f"world_model={tmp_path}/wm/out", NO_EXTRA,
                     f"target.done={tmp_path}/done/out", f"target.done_weight={weight}", f"target.done_target={done_target}",
                     "target.steps=60", "target.lr=3e-3", "target.horizon=6", "target.eval_every=60",
                     "target.eval_windows=64", tiny=COMMON)
        return cfg, train(cfg, tmp_path / f"long{weight}_run")[metric]

    metric = "done_truth_gap_h6" if done_target == "truth" else "done_gap_h6"

    cfg, gap = run(100)
    target = make_target(cfg)
    b = target.batch(np.random.default_rng(0), 8)
    assert b["clauses"].shape == (8, 1, 384) and b["clause_mask"].shape == (8, 1)  # one-step families: one clause
    assert ("clause_truth" in b) == (done_target == "truth")
    if done_target == "truth":
        assert b["clause_truth"].shape == (8, 6, 1) and set(b["clause_truth"].unique().tolist()) <= {0.0, 1.0}
    assert not any(p.requires_grad for p in target.objective.done_model.parameters())
    # the same held-out windows, before training and after training without the term
    assert gap < target.evaluate()[metric] and gap < run(0)[1]
    with pytest.raises(ValueError, match="needs a done model"):
        make_target(config(tmp_path / "x", tiny_dataset, "target=predictor", f"world_model={tmp_path}/wm/out", NO_EXTRA,
                           "target.done=null", tiny=COMMON))


def test_the_scoring_done_model_is_the_done_recipe_on_more_rows_and_pad_episodes_with_a_run_of_its_own():
    """target=scoring_done trains a done model (foresight-score's) on more rows, a share of them from
    the push-to-pad set, in its own run directory, so that it never resumes the planner's done
    model's run, and saves it beside, not over, that one."""
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        runs = {}
        for choice in ("done", "scoring_done"):
            cfg = compose("train", overrides=[f"target={choice}"], return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)  # what foresight-train's own run resolves the dir against
            runs[choice] = (cfg.hydra.run.dir, cfg.target)
    (done_dir, done), (scoring_dir, scoring) = runs["done"], runs["scoring_done"]
    assert scoring.name == done.name == "done" and scoring.examples == 10 * done.examples
    assert list(done.extra_data) == [] and list(scoring.extra_data) == ["data/tabletop_pads.h5"]
    assert done_dir == "outputs/train/done" and scoring_dir == "outputs/train/scoring_done"
    assert scoring.out != done.out and Path(scoring.out).name == OmegaConf.load(CONFIG_DIR + "/score.yaml").done


def test_the_done_models_rows_come_from_every_dataset_in_proportion_to_its_episodes(tmp_path, tiny_dataset):
    """target.extra_data: each dataset gives rows in proportion to its episodes (here three copies of
    one dataset, a third each), and each row's latent is that of a frame of its own dataset."""
    train(config(tmp_path / "wm", tiny_dataset, "target.steps=2"), tmp_path / "wm_run")
    target = make_target(config(tmp_path / "done", tiny_dataset, "target=done", f"world_model={tmp_path}/wm/out",
                                "target.model.width=32", "target.examples=900", "target.eval_examples=100",
                                f"target.extra_data=[{tiny_dataset},{tiny_dataset}]", tiny=COMMON))
    rows = target.train
    assert len(rows) == 900 and len(rows.labels) == len(rows.kinds) == len(rows.text_row) == 900
    # Rows i * 300 onwards come from copy i and read only its latents (each copy's frames encoded once).
    ends = np.cumsum([0] + [len(np.unique(rows.frame_row[i * 300:(i + 1) * 300])) for i in range(3)])
    assert ends[-1] == len(rows.z)
    for i in range(3):
        part = rows.frame_row[i * 300:(i + 1) * 300]
        assert ends[i] <= part.min() and part.max() < ends[i + 1]


def test_relabelled_subgoals_hold_where_the_episodes_succeeded_and_not_at_their_start(tiny_dataset):
    """The done model's labels, read from the privileged state: an episode's own subgoal holds at the
    last frame of a successful one-step episode and at no episode's first frame (the tasks are laid
    out so that none holds at the start); random instructions of the scene hold sometimes."""
    ds = EpisodeDataset(tiny_dataset, load=True)
    frames, texts, kinds, labels = relabel_subgoals(ds, np.random.default_rng(0), 3000, own_share=1.0)
    episode = np.searchsorted(ds.starts, frames, side="right") - 1
    last = frames == ds.starts[episode] + ds.lengths[episode]
    assert labels[last & ds.success[episode]].all() and last.sum() > 10
    assert not labels[frames == ds.starts[episode]].any()
    assert {k for k in kinds} == {"pad", "region"}  # the tiny set's two families
    assert all(ds.task(int(e))["subgoals"][0]["object"] in t for e, t in zip(episode[:50], texts[:50]))
    _, _, kinds, labels = relabel_subgoals(ds, np.random.default_rng(1), 3000, own_share=0.0)
    assert set(kinds) == {"touch", "pad", "region"} and 0.02 < labels[kinds == "region"].mean() < 0.9


def test_cut_windows_stop_the_pusher_before_the_outcome_and_hold_the_scene_where_it_stopped(tiny_dataset):
    """resting_windows with cut_share=1: each window's actions stop at some step (never to restart), and
    from there its latents are those of the frame where the pusher stopped, often before the outcome."""
    ds = EpisodeDataset(tiny_dataset, load=True)
    frame_of = torch.arange(len(ds.frames["state"]), dtype=torch.float32)[:, None]  # a latent that names its frame
    cfg = WorldModelConfig(chunk=8, history=2)
    b = resting_windows(ds, frame_of, torch.zeros(len(ds), 384), None, np.random.default_rng(0), 64, cfg, 12,
                        start_share=1.0, cut_share=1.0)
    moving = b["actions"].flatten(1, 2).abs().sum(-1) > 0  # [B, steps]
    early = 0
    for w in range(64):
        stop = int(moving[w].nonzero().max()) + 1  # the first step of the rest
        first = int(b["z"][w, 0, 0])  # the episode's first frame (start_share=1)
        e = int(np.searchsorted(ds.starts, first, side="right") - 1)
        stopped_at = first + stop
        assert stopped_at <= ds.starts[e] + ds.lengths[e]
        held = b["z"][w, 2 + stop // 8 + (stop % 8 > 0):, 0]  # latents after the chunk the pusher stopped in
        assert (held == stopped_at).all()
        early += stopped_at < ds.starts[e] + ds.lengths[e]
    assert early > 32


def test_clause_truth_holds_at_successful_outcomes_and_never_at_episode_starts(tiny_dataset):
    """What the predictor's done term learns from with done_target=truth: per frame, whether each
    clause of the episode's instruction holds; at a successful episode's outcome it does, at a first
    frame it never does (tasks are laid out so), and in between it sometimes does."""
    ds = EpisodeDataset(tiny_dataset, load=True)
    truth = clause_truth(ds)
    assert truth.shape == (len(ds.frames["state"]), 1)  # one-step families: one clause
    outcomes = ds.starts + ds.lengths
    assert (truth[outcomes[ds.success], 0] == 1).all() and (truth[ds.starts, 0] == 0).all()
    assert 0 < truth.mean() < 0.5


def test_random_shift_reports_how_far_the_content_moved():
    images = np.zeros((16, 1, 12, 12, 3), np.uint8)
    images[:, :, 5, 7] = 255  # one bright pixel at row 5, column 7
    shifted, moved = random_shift(images, 3, np.random.default_rng(0))
    for image, (right, down) in zip(shifted, moved):
        assert image[0, 5 + down, 7 + right].all()
    assert len({tuple(m) for m in moved}) > 1 and np.abs(moved).max() <= 3


def test_named_point_targets_land_on_the_named_object_and_pad_in_the_frames(tiny_dataset):
    ds = EpisodeDataset(tiny_dataset, load=True)
    where = named_point_targets(ds, np.arange(len(ds)))
    size = ds.frames["pixels"].shape[2]
    chroma = lambda c: np.asarray(c, float) / np.sum(c)  # hue, whatever the lighting's brightness
    for i in range(len(ds)):
        first, kind = int(ds.starts[i]), ds.task(i)["subgoals"][0]["kind"]
        col, row = ((where[first] + 1) / 2 * size).astype(int).T
        seen = [ds.frames["pixels"][first, 0, r, c] + 1e-3 for r, c, ok in
                zip(row, col, np.isfinite(where[first]).all(1)) if ok]
        assert len(seen) == (3 if kind == "pad" else 2), i  # the pusher, the object; a region is not a thing in view
        assert seen[0].mean() < 0.5 * 255 * np.mean(TABLE_RGB), i  # on the dark pusher
        # On the object and its pad, not on the table (bright tints saturate: hues are not compared).
        assert all(np.abs(chroma(hue) - chroma(TABLE_RGB)).sum() > 0.1 for hue in seen[1:]), i


def test_table_symmetry_moves_pixels_state_actions_and_where_targets_together(tiny_dataset):
    ds = EpisodeDataset(tiny_dataset, load=True)
    frames = ds.starts[:4] + 3
    pixels, state = ds.frames["pixels"][frames], ds.frames["state"][frames]
    where = named_point_targets(ds, np.arange(len(ds)))[frames]  # [4, P, 2]: the pusher first
    size = pixels.shape[2]
    pixel_at = lambda image, uv: image[0, int(np.floor((uv[1] + 1) / 2 * size)), int(np.floor((uv[0] + 1) / 2 * size))]
    seen = set()
    for g in range(8):
        which = np.full(len(frames), g)
        # The pusher's velocity stands in for an action: both are (vx, vy) and must turn alike.
        p2, s2, a2, w2 = table_symmetry(pixels, state, state[:, None, 2:4], where, which)
        np.testing.assert_allclose(a2[:, 0], s2[:, 2:4])
        np.testing.assert_allclose(np.abs(s2).sum(1), np.abs(state).sum(1), rtol=1e-6)
        seen.add(tuple(np.round(s2[0, :2], 6)))
        for i in range(len(frames)):
            # Where the moved pusher projects through the real camera is where its target moved to ...
            np.testing.assert_allclose(image_coords(np.r_[s2[i, :2], PUSHER_TOP]), w2[i, 0], atol=1e-5)
            # ... and every named point's pixel moved with it.
            for uv, uv2 in zip(where[i], w2[i]):
                if np.isfinite(uv).all() and np.abs(uv).max() < 0.95:
                    np.testing.assert_array_equal(pixel_at(p2[i], uv2), pixel_at(pixels[i], uv))
    assert len(seen) == 8  # eight different poses of the same scene
    identity = table_symmetry(pixels, state, state[:, None, 2:4], where, np.zeros(4, int))
    np.testing.assert_array_equal(identity[0], pixels)


def test_vla_trains_on_relabelled_episodes_with_the_where_auxiliary_and_fine_tunes(tmp_path, tiny_dataset):
    vla = ["target=vla", "target.policies=[mixed]", "target.eval_policies=[mixed]", "target.labels=expert",
           "target.model.where_weight=1.0", "target.where_frames=4", "target.symmetry=true",
           "target.model.true_points=true", "target.blank_names=true", "target.model.width=32", "target.model.keypoints=4",
           "target.perception_batch=null",  # free keypoints: every window through the CNN
           "target.model.expert_width=32", "target.model.expert_blocks=1", "target.eval_windows=8"]
    cfg = config(tmp_path, tiny_dataset, *vla, "target.steps=6", "target.eval_every=6", tiny=COMMON)
    final = train(cfg, tmp_path / "run")
    assert {"flow", "where", "chunk_abs_error"} <= set(final)
    logged = [m for m in metrics(tmp_path / "run/metrics.jsonl") if "loss" in m]
    assert all(m["loss"] > m["flow"] for m in logged)  # the where term is in the loss
    shipped = VLA.load(tmp_path / "out").cfg
    assert shipped.where_weight == 1.0 and shipped.true_points and {"red", "cube"} <= set(shipped.blank_words)
    bad = config(tmp_path, tiny_dataset, "target=vla", "target.policies=[mixed]", "target.eval_policies=[mixed]",
                 "target.labels=imagined", tiny=COMMON)
    with pytest.raises(ValueError, match="target.labels must be recorded or expert"):
        train(bad, tmp_path / "bad")
    ds = EpisodeDataset(tiny_dataset)
    family = [ds.task(i)["family"] for i in range(len(ds))]
    assert [family[i] for i in first_of_each_family(ds, np.arange(len(ds)), {"push_to_pad": 2})] == ["push_to_pad"] * 2
    with pytest.raises(ValueError, match=r"family_episodes names \['reach'\]"):
        train(config(tmp_path, tiny_dataset, *vla, "target.family_episodes={reach: 3}", tiny=COMMON), tmp_path / "bad")
    # perception_batch: the CNN sees the pixels of the first 3 of a step's 8 windows, the policy
    # learns from all 8 (from their true points); a context that reads free keypoints cannot.
    fast = [o for o in vla if not o.startswith(("target.where_frames", "target.symmetry", "target.model.keypoints",
                                                "target.perception_batch"))]
    fast_cfg = config(tmp_path / "fast", tiny_dataset, *fast, "target.model.keypoints=0", "target.perception_batch=3",
                      "target.steps=2", tiny=COMMON)
    rows = make_target(fast_cfg).batch(np.random.default_rng(0), 8)
    assert len(rows["pixels"]) == 3 and len(rows["state"]) == len(rows["actions"]) == len(rows["where"]) == 8
    assert "where" in train(fast_cfg, tmp_path / "fast/run")
    with pytest.raises(ValueError, match="target.perception_batch=3 .* model.keypoints=0"):
        make_target(config(tmp_path / "fast", tiny_dataset, *fast, "target.model.keypoints=4",
                           "target.perception_batch=3", tiny=COMMON))
    # Fine-tuning starts from the given weights: at lr 0 it ends with them unchanged.
    tuned = config(tmp_path / "tuned", tiny_dataset, *vla, "target.lr=0", "target.steps=2",
                   f"target.init={tmp_path}/out", tiny=COMMON)
    train(tuned, tmp_path / "tuned/run")
    before, after = VLA.load(tmp_path / "out").state_dict(), VLA.load(tmp_path / "tuned/out").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_vla_ships_its_weight_average_and_a_resume_restores_it(tmp_path, tiny_dataset):
    vla = ["target=vla", "target.policies=[mixed]", "target.eval_policies=[mixed]", "target.model.width=32",
           "target.model.keypoints=4", "target.perception_batch=null", "target.model.expert_width=32", "target.model.expert_blocks=1",
           "target.eval_windows=8", "target.weight_ema=0.9", "target.checkpoint_every=2", "target.eval_every=100"]
    train(config(tmp_path / "a", tiny_dataset, *vla, "target.steps=4", tiny=COMMON), tmp_path / "a/run")
    live, _ = load_checkpoint(tmp_path / "a/run/checkpoint")
    shipped = VLA.load(tmp_path / "a/out").state_dict()
    assert all(torch.equal(shipped[k], live[f"ema_vla.{k}"]) for k in shipped)
    assert not all(torch.equal(shipped[k], live[f"vla.{k}"]) for k in shipped)  # the average, not the last step
    # Two steps (both in warmup, so the same learning rates), then resumed to four: the same average.
    train(config(tmp_path / "b", tiny_dataset, *vla, "target.steps=2", tiny=COMMON), tmp_path / "b/run")
    train(config(tmp_path / "b", tiny_dataset, *vla, "target.steps=4", tiny=COMMON), tmp_path / "b/run")
    resumed = VLA.load(tmp_path / "b/out").state_dict()
    assert all(torch.allclose(shipped[k], resumed[k]) for k in shipped)


def _train_cli(tmp_path, data, run, *overrides, **popen):
    args = [f"data={data}", f"eval_data={data}", f"target.out={tmp_path}/out", f"hydra.run.dir={run}", *TINY, *overrides]
    return subprocess.Popen([sys.executable, "-m", "experiments.train", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **popen)


def test_resume_after_a_kill_logs_the_same_losses(tmp_path, tiny_dataset):
    args = ("target.steps=300", "target.checkpoint_every=10", "target.eval_every=1000")
    assert _train_cli(tmp_path, tiny_dataset, tmp_path / "a", *args).wait() == 0
    proc = _train_cli(tmp_path, tiny_dataset, tmp_path / "b", *args, start_new_session=True)
    state = tmp_path / "b/checkpoint/training_state.json"
    while not state.exists() and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(state.read_text())["step"]
    assert killed_at < 300, "the run finished before it could be killed"
    resumed = _train_cli(tmp_path, tiny_dataset, tmp_path / "b", *args)
    assert resumed.wait() == 0, resumed.stderr.read()
    assert losses(tmp_path / "b/metrics.jsonl") == losses(tmp_path / "a/metrics.jsonl")


def test_torchrun_with_two_processes(tmp_path, tiny_dataset):
    torchrun = Path(sys.executable).with_name("torchrun")
    args = [f"data={tiny_dataset}", f"eval_data={tiny_dataset}", f"target.out={tmp_path}/out",
            f"hydra.run.dir={tmp_path}/run", *TINY, "target.steps=6", "target.eval_every=6"]
    done = subprocess.run([str(torchrun), "--nproc_per_node=2", "-m", "experiments.train", *args],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [m["step"] for m in metrics(tmp_path / "run/metrics.jsonl") if "loss" in m] == list(range(1, 7))
    assert all(torch.isfinite(p).all() for p in WorldModel.load(tmp_path / "out").parameters())


def test_without_a_regulariser_the_latents_collapse(tmp_path, tiny_dataset):
    # The prediction losses alone: the contrast term also keeps frames apart, so it is off here.
    # (The 8x8 grid's latents collapse more slowly than the 4x4's, and with the two-block
    # predictor the collapse comes after 200-300 steps: 500 steps.)
    std = {}
    for regularizer in ("none", "sigreg"):
        cfg = config(tmp_path / regularizer, tiny_dataset, "target.steps=500", "target.batch=32",
                     "target.eval_every=1000", "target.lr=3e-3", f"target.loss.regularizer={regularizer}",
                     "target.loss.contrast=0", "target.loss.inverse=0")
        train(cfg, tmp_path / regularizer / "run")
        logged = [m["latent_std"] for m in metrics(tmp_path / regularizer / "run/metrics.jsonl") if "latent_std" in m]
        std[regularizer] = sum(logged[-20:]) / 20
    assert std["none"] < 0.25 * std["sigreg"] and std["sigreg"] > 0.5, std
