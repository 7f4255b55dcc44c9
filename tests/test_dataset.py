"""The HDF5 episode dataset: round trips, windows, crash safety, clear errors, collection."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import envs
from envs.dataset import (DatasetError, DatasetMeta, Episode, EpisodeDataset, EpisodeWriter,
                          WindowSampler, dataset_meta, record_episode)

META = DatasetMeta("foresight/Tabletop-v0", {"image_size": 16}, 10.0, -np.ones(2), np.ones(2), ("top",))
SHAPES = {"object_pos": (6, 3)}


def fake_episode(seed: int, length: int) -> Episode:
    r = np.random.default_rng(seed)
    return Episode(pixels=r.integers(0, 256, (length + 1, 1, 16, 16, 3), dtype=np.uint8),
                   state=r.normal(size=(length + 1, 4)).astype(np.float32),
                   action=r.uniform(-1, 1, (length, 2)).astype(np.float32),
                   instruction=f"push the red cube, episode {seed}", task={"family": "reach", "seed": seed},
                   success=bool(seed % 2), seed=seed, policy="expert",
                   privileged={"object_pos": r.normal(size=(length + 1, 1 + seed % 3, 3))})


def write(path, episodes):
    with EpisodeWriter(path, META, SHAPES) as writer:
        for ep in episodes:
            writer.append(ep)


def test_round_trip_is_exact_and_stats_are_stored(tmp_path):
    episodes = [fake_episode(s, 10 + s) for s in range(6)]
    write(tmp_path / "d.h5", episodes)
    with EpisodeDataset(tmp_path / "d.h5") as ds:
        assert len(ds) == 6 and ds.meta.env_id == META.env_id and ds.meta.cameras == ("top",)
        for i, ep in enumerate(episodes):
            got = ds.episode(i)
            np.testing.assert_array_equal(got.pixels, ep.pixels)
            np.testing.assert_array_equal(got.state, ep.state)
            np.testing.assert_array_equal(got.action, ep.action)
            assert (got.instruction, got.task, got.success, got.seed) == (ep.instruction, ep.task, ep.success, ep.seed)
            n = ep.privileged["object_pos"].shape[1]
            np.testing.assert_allclose(got.privileged["object_pos"][:, :n], ep.privileged["object_pos"], rtol=1e-6)
            assert np.isnan(got.privileged["object_pos"][:, n:]).all()
        actions = np.concatenate([ep.action for ep in episodes])
        np.testing.assert_allclose(ds.stats["action"]["mean"], actions.mean(0), rtol=1e-5)
        np.testing.assert_allclose(ds.stats["action"]["max"], actions.max(0))
        states = np.concatenate([ep.state for ep in episodes])
        np.testing.assert_allclose(ds.stats["state"]["std"], states.std(0), rtol=1e-4)


def test_a_row_caught_half_written_is_not_an_episode_yet(tmp_path):
    # The writer grows the episode table column by column; a reader in between must not count the row.
    write(tmp_path / "d.h5", [fake_episode(s, 5) for s in range(2)])
    with h5py.File(tmp_path / "d.h5", "r+") as f:
        f["episodes/start"].resize(3, axis=0)
        f["episodes/start"][2] = 12
        del f.attrs["stats"]  # a file still being collected has none: the reader computes them
    with EpisodeDataset(tmp_path / "d.h5") as ds:
        assert len(ds) == 2 and list(ds.seeds) == [0, 1] and len(ds.instructions) == 2
        assert ds.stats["action"]["mean"] == pytest.approx(ds.frames["action"][[0, 1, 2, 3, 4, 6, 7, 8, 9, 10]].mean(0))


def test_windows_are_the_right_slices_of_their_episodes(tmp_path):
    write(tmp_path / "d.h5", [fake_episode(s, 20 + 3 * s) for s in range(4)])
    ds = EpisodeDataset(tmp_path / "d.h5", load=True)
    sampler = WindowSampler(ds, history=2, horizon=3, chunk=4)
    assert len(sampler) == sum(max(0, n - 12 - 1 + 1) for n in ds.lengths)
    w = sampler.sample(np.random.default_rng(0), 64)
    assert w.pixels.shape == (64, 2, 1, 16, 16, 3) and w.actions.shape == (64, 3, 4, 2)
    for i in range(64):
        ep, t = ds.episode(int(w.episode[i])), int(w.t[i])
        np.testing.assert_array_equal(w.pixels[i], ep.pixels[t - 1:t + 1])
        np.testing.assert_array_equal(w.actions[i].reshape(-1, 2), ep.action[t:t + 12])
        np.testing.assert_array_equal(w.future_pixels[i], ep.pixels[[t + 4, t + 8, t + 12]])
        np.testing.assert_array_equal(w.future_state[i], ep.state[[t + 4, t + 8, t + 12]])
    with pytest.raises(ValueError, match="no episode is long enough"):
        WindowSampler(ds, history=1, horizon=10, chunk=8)


def test_padded_windows_reach_the_last_frame_and_flag_the_copies(tmp_path):
    write(tmp_path / "d.h5", [fake_episode(s, 6 + 3 * s) for s in range(3)])  # 6, 9, 12 actions
    ds = EpisodeDataset(tmp_path / "d.h5", load=True)
    sampler = WindowSampler(ds, history=1, horizon=2, chunk=4, pad_end=True)
    assert len(sampler) == ds.lengths.sum()  # every frame with an action after it, short episodes too
    w = sampler.sample(np.random.default_rng(0), 200)
    assert set(w.t[w.episode == 0]) == set(range(6))
    for i in range(200):
        ep, t = ds.episode(int(w.episode[i])), int(w.t[i])
        n = len(ep.action)
        steps = np.arange(t, t + 8)
        np.testing.assert_array_equal(w.action_pad[i], steps >= n)
        np.testing.assert_array_equal(w.actions[i].reshape(-1, 2), ep.action[np.minimum(steps, n - 1)])
        np.testing.assert_array_equal(w.future_state[i], ep.state[np.minimum([t + 4, t + 8], n)])
    unpadded = WindowSampler(ds, history=1, horizon=2, chunk=4).sample(np.random.default_rng(0), 50)
    assert not unpadded.action_pad.any()


def test_sampler_needs_frames_in_memory(tmp_path):
    write(tmp_path / "d.h5", [fake_episode(0, 10)])
    with pytest.raises(ValueError, match="load=True"):
        WindowSampler(EpisodeDataset(tmp_path / "d.h5"), 1, 1, 1)


def test_truncated_foreign_and_missing_files_get_clear_errors(tmp_path):
    write(tmp_path / "d.h5", [fake_episode(s, 30) for s in range(3)])
    data = (tmp_path / "d.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 3])
    with pytest.raises(DatasetError, match="cut.h5 is not a readable HDF5 file"):
        EpisodeDataset(tmp_path / "cut.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(DatasetError, match="not a Foresight episode dataset"):
        EpisodeDataset(tmp_path / "other.h5")
    (tmp_path / "notes.h5").write_text("hello")
    with pytest.raises(DatasetError, match="notes.h5 is not a readable HDF5 file"):
        EpisodeDataset(tmp_path / "notes.h5")
    with pytest.raises(DatasetError, match="no dataset at"):
        EpisodeDataset(tmp_path / "missing.h5")


def test_appending_episodes_of_another_env_is_refused(tmp_path):
    write(tmp_path / "d.h5", [fake_episode(0, 5)])
    other = DatasetMeta("foresight/Tabletop-v0", {"image_size": 32}, 10.0, -np.ones(2), np.ones(2), ("top",))
    with pytest.raises(DatasetError, match="append to a new file instead"):
        EpisodeWriter(tmp_path / "d.h5", other, SHAPES)


def test_a_writer_waits_for_a_reader_that_holds_the_file(tmp_path):
    """A reader (another process) holding the file locks it against appending; the writer waits for
    the read to end instead of failing (the collector died this way when a reader opened the file
    the instant after it was created)."""
    path = tmp_path / "d.h5"
    write(path, [fake_episode(0, 5)])
    hold = "import h5py, sys, time; f = h5py.File(sys.argv[1], 'r', libver='latest'); print(1, flush=True); time.sleep(1.5)"
    reader = subprocess.Popen([sys.executable, "-c", hold, str(path)], stdout=subprocess.PIPE, text=True)
    assert reader.stdout.readline().strip() == "1"  # the reader holds the file now
    with pytest.raises(BlockingIOError):
        h5py.File(path, "a", libver="latest").close()
    write(path, [fake_episode(1, 5)])
    reader.wait()
    with EpisodeDataset(path) as ds:
        assert list(ds.seeds) == [0, 1]


_KILLED_WRITER = """
import sys, numpy as np
sys.path.insert(0, {tests!r})
from test_dataset import fake_episode, META, SHAPES
from envs.dataset import EpisodeWriter
writer = EpisodeWriter({path!r}, META, SHAPES)
for seed in range(1000):
    writer.append(fake_episode(seed, 40))
    print(seed, flush=True)
"""


def test_a_writer_killed_mid_write_leaves_complete_episodes_and_resumes(tmp_path):
    path = tmp_path / "d.h5"
    code = _KILLED_WRITER.format(tests=str(Path(__file__).parent), path=str(path))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if int(line) >= 5:  # at least 6 episodes are complete; more may be mid-write
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with EpisodeDataset(path) as ds:
        n = len(ds)
        assert n >= 6
        np.testing.assert_array_equal(ds.episode(n - 1).pixels, fake_episode(n - 1, 40).pixels)
    write(path, [fake_episode(n, 40)])  # reopening recovers the file, then appends
    with EpisodeDataset(path) as ds:
        assert len(ds) == n + 1 and list(ds.seeds) == list(range(n + 1))
        assert "state" in ds.stats


def test_recorded_expert_episode_ends_on_its_success_frame():
    env = envs.make_env(image_size=16)
    ep = record_episode(env, env.unwrapped.make_expert(), seed=3, policy_name="expert")
    meta = dataset_meta(env, {"image_size": 16})
    env.close()
    assert ep.success and len(ep.pixels) == len(ep.action) + 1 == len(ep.state)
    assert ep.pixels.shape[1:] == (1, 16, 16, 3) and meta.cameras == ("top",) and meta.control_hz == 10
    assert ep.privileged["object_pos"].shape == (len(ep.pixels), 6, 3)
    assert ep.task["family"] in envs.FAMILIES and ep.instruction


def _collect(tmp_path, *args, size=16, **popen):
    cmd = [str(Path(sys.executable).parent / "foresight-collect"), f"env.image_size={size}",
           f"hydra.run.dir={tmp_path}/run", *args]
    if popen:
        return subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)


def test_collection_killed_then_resumed_holds_every_seed_once(tmp_path):
    out = tmp_path / "c.h5"
    proc = _collect(tmp_path, "episodes=30", "policy=mixture", f"out={out}", start_new_session=True)
    deadline = time.monotonic() + 180  # generous: the collector starts slowly on a loaded machine
    while time.monotonic() < deadline:
        try:
            with EpisodeDataset(out) as ds:
                if len(ds) >= 3:
                    break
        except DatasetError:
            pass
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the collector and its workers, mid-run
    proc.wait()
    with EpisodeDataset(out) as ds:
        assert 3 <= len(ds) < 30
    result = _collect(tmp_path, "episodes=30", "policy=mixture", f"out={out}")
    assert result.returncode == 0, result.stderr
    with EpisodeDataset(out) as ds:
        assert sorted(ds.seeds) == list(range(30))
        assert {p.split("(")[0] for p in ds.policies} <= {"expert", "noisy_expert", "random"}
        assert json.loads(ds._file.attrs["stats"])["action"]["max"][0] <= 1.0


def test_dagger_episodes_are_the_vlas_own_with_expert_steps_at_rate_beta(tmp_path, tiny_checkpoints):
    """policy=dagger records the VLA acting (beta=0) or the clean expert (beta=1) from the same
    states; the file says which policy it was."""
    from models.vla import VLA
    from planner import ForesightController, PlannerConfig
    from experiments.collect import DAggerPolicy

    vla = VLA.load(tiny_checkpoints / "vla")
    env = envs.make_env(image_size=32)
    for beta in (0.0, 1.0):
        ctrl = ForesightController(PlannerConfig(mode="vla", n_exec=1), vla=vla, text_encoder=None)
        twin = ForesightController(PlannerConfig(mode="vla", n_exec=1), vla=vla, text_encoder=ctrl.text)
        expert = env.unwrapped.make_expert()
        policy = DAggerPolicy(ctrl, expert, beta, np.random.default_rng(0), seed=5)
        obs, info = env.reset(seed=5, options={"task": "push_to_pad"})
        policy.reset(obs["instruction"])
        twin.reset(obs["instruction"], seed=5)
        for _ in range(3):
            action, vla_action, expert_action = policy.act(info, obs), twin.act(obs), expert.clean_action(info)
            np.testing.assert_allclose(action, vla_action if beta == 0 else np.clip(expert_action, -1, 1), atol=1e-6)
            obs, _, _, _, info = env.step(action)
    env.close()
    out = tmp_path / "d.h5"
    result = _collect(tmp_path, "episodes=2", "policy=dagger", f"dagger.vla={tiny_checkpoints / 'vla'}",
                      "dagger.beta=0.5", f"out={out}", size=32)
    assert result.returncode == 0, result.stderr
    with EpisodeDataset(out) as ds:
        assert list(ds.policies) == ["dagger", "dagger"] and sorted(ds.seeds) == [0, 1]


@pytest.mark.parametrize("args, message", [
    (["policy=teleport"], "unknown policy 'teleport'"),
    (["policy=dagger", "dagger.vla=nowhere"], "the directory does not exist"),
    (["seed=999999", "episodes=5"], "must stay below 1000000"),
    (["noise=2"], "noise and mixture_noise must be in"),
])
def test_collect_rejects_bad_settings_in_one_line(tmp_path, args, message):
    result = _collect(tmp_path, f"out={tmp_path}/x.h5", *args)
    assert result.returncode == 2 and message in result.stderr.strip().splitlines()[-1]


def test_history_can_be_strided_by_chunks(tmp_path):
    write(tmp_path / "d.h5", [fake_episode(s, 30) for s in range(2)])
    ds = EpisodeDataset(tmp_path / "d.h5", load=True)
    w = WindowSampler(ds, history=3, horizon=1, chunk=4, stride=4).sample(np.random.default_rng(1), 16)
    for i in range(16):
        ep, t = ds.episode(int(w.episode[i])), int(w.t[i])
        assert t >= 8
        np.testing.assert_array_equal(w.state[i], ep.state[[t - 8, t - 4, t]])
