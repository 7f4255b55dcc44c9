"""The command-line entry points, run as a user would, with small configs."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio
import pytest

from experiments.common import wilson_interval

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


def run(cmd, tmp_path, check=True):
    result = subprocess.run([str(BIN / cmd[0]), *cmd[1:]], capture_output=True, text=True,
                            cwd=tmp_path, env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed:\n{result.stdout}\n{result.stderr}")
    return result


def test_experts_app_writes_results_and_a_playable_video_per_task(tmp_path):
    out = tmp_path / "run"
    result = run(["foresight-experts", "episodes=2", "video=true", "video_size=64",
                  "env.tasks=[reach,push_to_pad]", f"hydra.run.dir={out}"], tmp_path)
    data = json.loads((out / "results.json").read_text())
    assert set(data["results"]) == {"reach", "push_to_pad"}
    assert data["results"]["reach"]["episodes"] == 2
    assert data["first_seed"] >= 1_000_000  # evaluation seeds, never training seeds
    assert "| reach" in result.stdout
    for family in ("reach", "push_to_pad"):
        reader = imageio.get_reader(out / "videos" / f"{family}.mp4", format="FFMPEG")
        frames = list(reader.iter_data())  # its len() is inf, so list(reader) would not do
        assert len(frames) >= 2 and frames[0].shape[1] == 64


def test_experts_app_rejects_a_bad_perturbation_in_one_line(tmp_path):
    result = run(["foresight-experts", "episodes=1", "+env.perturbations.fog=0.5",
                  f"hydra.run.dir={tmp_path}/run"], tmp_path, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: unknown perturbation axis 'fog'")


def test_bench_env_suite_reports_min_median_max(tmp_path):
    out = tmp_path / "env.json"
    result = run(["foresight-bench", "env", "--repeats", "2", "--steps", "60", "--out", str(out)], tmp_path)
    data = json.loads(out.read_text())
    steps = data["metrics"]["steps_per_s"]
    assert len(steps["samples"]) == 2 and steps["min"] <= steps["median"] <= steps["max"]
    assert steps["min"] > 0 and data["cores"] == 1
    assert "steps_per_s" in result.stdout


def test_bench_data_suite_builds_its_cached_dataset_then_samples(tmp_path):
    out = tmp_path / "data.json"
    run(["foresight-bench", "data", "--repeats", "1", "--episodes", "3", "--horizon", "1", "--chunk", "2",
         "--out", str(out)], tmp_path)
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["windows_per_s"]["median"] > 0 and metrics["frames"]["median"] > 3
    assert (tmp_path / "outputs" / "bench" / "data_tabletop.h5").exists()


def test_bench_world_model_suite_times_rollouts_and_counts_their_flops(tmp_path):
    out = tmp_path / "wm.json"
    run(["foresight-bench", "world_model", "--repeats", "1", "--candidates", "32", "--train-batch", "2",
         "--min-time", "0.01", "--checkpoint", "none", "--out", str(out)], tmp_path)
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["chunk_steps_per_s"]["median"] > 0 and metrics["train_windows_per_s"]["median"] > 0
    # The default predictor's linear layers alone are ~0.23 MFLOP per imagined chunk-step.
    assert 1e5 < metrics["flops_per_chunk_step"]["median"] < 1e7
    assert 0 < metrics["fraction_of_matmul_peak"]["median"] < 2


@pytest.mark.parametrize("checkpoint", ["none", "shipped"])
def test_bench_vla_suite_times_one_and_64_chunks_and_training(tmp_path, checkpoint):
    """A random-init VLA, and the shipped one, whose training step needs the where targets and
    whose CNN sees only the first of a step's windows."""
    out = tmp_path / "vla.json"
    model = ["--vla-checkpoint", "none"] if checkpoint == "none" else [
        "--vla-checkpoint", str(ROOT / "checkpoints/tabletop/vla"), "--perception-batch", "1"]
    run(["foresight-bench", "vla", "--repeats", "1", "--train-batch", "2", "--min-time", "0.01", *model,
         "--out", str(out)], tmp_path)
    metrics = json.loads(out.read_text())["metrics"]
    for name in ("sample_ms_n1", "sample_ms_n64", "ratio_n64_to_n1", "train_samples_per_s", "peak_rss_mb"):
        assert math.isfinite(metrics[name]["median"]) and metrics[name]["median"] > 0, name


def _tiny_checkpoints(root):
    """Small random-init world model, goal model and VLA, saved as foresight-train saves them."""
    from models import WorldModel, WorldModelConfig
    from models.checkpoint import save_checkpoint
    from models.goal import GoalModel, GoalModelConfig
    from models.vla import VLA, VLAConfig

    latent = 16
    models = {"world_model": WorldModel(WorldModelConfig(latent_dim=latent, keypoints=4, width=32, blocks=1,
                                                         cond_dim=16)),
              "goal": GoalModel(GoalModelConfig(latent_dim=latent, width=32, critic_dim=16)),
              "vla": VLA(VLAConfig(backbone="cnn", width=32, keypoints=4, expert_width=32, expert_blocks=1,
                                   flow_steps=2, latent_dim=latent))}
    for kind, model in models.items():
        save_checkpoint(root / kind, {kind: model}, {"kind": kind, "model": model.cfg.to_dict()})
    return root


def test_bench_planner_suite_times_every_mode_and_the_reference_optimizers(tmp_path):
    from planner import MODES

    out = tmp_path / "planner.json"
    result = run(["foresight-bench", "planner", "--repeats", "1", "--replans", "2", "--observations", "2",
                  "--checkpoints", str(_tiny_checkpoints(tmp_path / "checkpoints")), "--out", str(out)], tmp_path)
    metrics = json.loads(out.read_text())["metrics"]
    names = [f"{mode}_{what}" for mode in MODES for what in ("ms_median", "ms_p95", "rollouts")]
    names += [f"{ref}_{what}_ratio" for ref in ("pytorch_mppi", "ng_cma") for what in ("time", "cost")]
    for name in names:
        assert math.isfinite(metrics[name]["median"]), name
    assert metrics["vla_rollouts"]["median"] == 0 and metrics["cem_rollouts"]["median"] > 0
    assert 0 < metrics["vla_cem_ms_median"]["median"] <= metrics["vla_cem_ms_p95"]["median"]
    assert "vla_cem_ms_median" in result.stdout


def test_bench_rejects_unknown_suites(tmp_path):
    result = run(["foresight-bench", "warp-drive"], tmp_path, check=False)
    assert result.returncode != 0 and "invalid choice" in result.stderr


@pytest.mark.parametrize("wins, n, lo, hi", [(0, 50, 0.0, 0.0714), (50, 50, 0.9286, 1.0), (25, 50, 0.3664, 0.6336)])
def test_wilson_interval_matches_reference_values(wins, n, lo, hi):
    got = wilson_interval(wins, n)
    assert got == pytest.approx((lo, hi), abs=1e-3)
