"""LeRobot v3.0 export/import: the layout LeRobot reads, and exact round trips."""

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import envs
from envs.dataset import DatasetError, EpisodeDataset, EpisodeWriter, dataset_meta, record_episode
from envs.experts import RandomPlay
from envs.lerobot import export_lerobot, import_lerobot


def collect(path, env_id, seeds, **kwargs):
    env = envs.make_env(env_id, **kwargs)
    base = env.unwrapped
    with EpisodeWriter(path, dataset_meta(env, kwargs), base.privileged_shapes) as writer:
        for seed in seeds:
            policy = base.make_expert() if seed % 2 == 0 else RandomPlay(env.action_space.shape[0],
                                                                         np.random.default_rng(seed))
            writer.append(record_episode(env, policy, seed, "expert" if seed % 2 == 0 else "random"))
    env.close()


def assert_round_trip(src, back):
    with EpisodeDataset(src) as a, EpisodeDataset(back) as b:
        assert len(a) == len(b) and a.meta.env_id == b.meta.env_id and a.meta.cameras == b.meta.cameras
        for i in range(len(a)):
            ea, eb = a.episode(i), b.episode(i)
            np.testing.assert_array_equal(ea.state, eb.state)
            np.testing.assert_array_equal(ea.action, eb.action)
            assert (ea.instruction, ea.task, ea.success, ea.seed, ea.policy) == \
                   (eb.instruction, eb.task, eb.success, eb.seed, eb.policy)
            err = np.abs(ea.pixels.astype(int) - eb.pixels.astype(int))
            assert err.mean() < 4.0  # H.264 at 64x64: measured ~2.5 grey levels
            assert np.percentile(err, 90) < 12


def test_tabletop_round_trip_and_the_v3_layout(tmp_path):
    src, out, back = tmp_path / "src.h5", tmp_path / "lerobot", tmp_path / "back.h5"
    collect(src, envs.TABLETOP_ID, range(4), cameras=("top", "front"))
    export_lerobot(src, out)
    info = json.loads((out / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 10 and info["total_episodes"] == 4
    assert {"observation.images.top", "observation.images.front", "observation.state", "action"} <= set(info["features"])
    data = pq.read_table(out / "data/chunk-000/file-000.parquet")
    assert {"timestamp", "frame_index", "episode_index", "index", "task_index"} <= set(data.column_names)
    assert data.num_rows == info["total_frames"]
    episodes = pq.read_table(out / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert episodes[1]["dataset_from_index"] == episodes[0]["dataset_to_index"]
    assert episodes[1]["videos/observation.images.top/from_timestamp"] == pytest.approx(episodes[0]["length"] / 10)
    tasks = pd.read_parquet(out / "meta/tasks.parquet")
    assert set(tasks.index) == {e["tasks"][0] for e in episodes}
    assert (out / "videos/observation.images.front/chunk-000/file-000.mp4").exists()
    assert set(json.loads((out / "meta/stats.json").read_text())) == {"observation.state", "action"}
    import_lerobot(out, back)
    assert_round_trip(src, back)


def test_metaworld_round_trip(tmp_path):
    src, out, back = tmp_path / "src.h5", tmp_path / "lerobot", tmp_path / "back.h5"
    collect(src, envs.metaworld_id("reach-v3"), [0], max_steps=30)
    export_lerobot(src, out)
    import_lerobot(out, back)
    assert_round_trip(src, back)


def test_import_can_resize_frames_for_our_models(tmp_path):
    src, out, back = tmp_path / "src.h5", tmp_path / "lerobot", tmp_path / "back.h5"
    collect(src, envs.TABLETOP_ID, [1], image_size=32)
    export_lerobot(src, out)
    import_lerobot(out, back, image_size=16)
    with EpisodeDataset(back) as ds:
        assert ds.episode(0).pixels.shape[2:] == (16, 16, 3)


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(DatasetError, match="meta/info.json is missing"):
        import_lerobot(tmp_path, tmp_path / "x.h5")
    (tmp_path / "old" / "meta").mkdir(parents=True)
    (tmp_path / "old" / "meta" / "info.json").write_text(json.dumps({"codebase_version": "v2.1"}))
    with pytest.raises(DatasetError, match="only v3.x imports"):
        import_lerobot(tmp_path / "old", tmp_path / "x.h5")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    collect(tmp_path / "src.h5", envs.TABLETOP_ID, [0], image_size=16)
    with pytest.raises(DatasetError, match="not empty"):
        export_lerobot(tmp_path / "src.h5", tmp_path / "full")
