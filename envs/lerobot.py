"""LeRobot v3.0 export and import, so our episodes and users' recordings move both ways.

The v3.0 layout (one chunk, one file per table; fine up to ~1000 episodes per dataset):

    meta/info.json                             schema, fps, path templates, totals
    meta/stats.json                            mean/std/min/max/count of state and action
    meta/tasks.parquet                         task string (the index) -> task_index
    meta/episodes/chunk-000/file-000.parquet   per episode: length, tasks, row range, video span
    data/chunk-000/file-000.parquet            per frame: timestamp, frame_index, episode_index,
                                               index, task_index, observation.state, action
    videos/observation.images.<camera>/chunk-000/file-000.mp4   all episodes back to back

Our episodes have T actions and T + 1 frames; a LeRobot episode has one action per frame. Export
writes T + 1 rows, the last with a zero action; import treats the last row's action as never
executed (its outcome is unobserved). States, actions and instructions round-trip exactly; pixels
go through H.264, so they come back within codec tolerance. Our extra per-episode facts (success,
seed, policy, task spec) ride along as `foresight/*` columns of the episodes table; a recording
made elsewhere (an SO-101 arm, say) has none, and imports with success False and its task text.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .dataset import DatasetError, DatasetMeta, Episode, EpisodeDataset, EpisodeWriter

CODEBASE_VERSION = "v3.0"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-000/file-000.parquet"
IMAGE_KEY = "observation.images."


def export_lerobot(dataset_path: str | os.PathLike, out_dir: str | os.PathLike, quality: int = 9) -> Path:
    """Write the dataset at `dataset_path` as a LeRobot v3.0 dataset in `out_dir` (made anew)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise DatasetError(f"{out} exists and is not empty; export into a new directory")
    tmp = out.with_name(out.name + ".exporting")
    shutil.rmtree(tmp, ignore_errors=True)
    with EpisodeDataset(dataset_path) as ds:
        fps = ds.meta.control_hz
        tasks = sorted(set(ds.instructions))
        task_index = {t: i for i, t in enumerate(tasks)}
        rows, episodes = _rows_and_episodes(ds, task_index, fps)
        for v, camera in enumerate(ds.meta.cameras):
            _write_video(tmp / VIDEO_PATH.format(video_key=IMAGE_KEY + camera, chunk_index=0, file_index=0),
                         (ds.episode(i).pixels[:, v] for i in range(len(ds))), fps, quality)
        state, action = np.concatenate(rows.pop("observation.state")), np.concatenate(rows.pop("action"))
        data = pa.table({**{k: np.concatenate(v) for k, v in rows.items()},
                         "observation.state": _list_column(state), "action": _list_column(action)})
        pq.write_table(data, _mkparent(tmp / DATA_PATH.format(chunk_index=0, file_index=0)))
        pq.write_table(pa.Table.from_pylist(episodes), _mkparent(tmp / EPISODES_PATH))
        pd.DataFrame({"task_index": range(len(tasks))}, index=pd.Index(tasks, name="task")).to_parquet(
            _mkparent(tmp / "meta/tasks.parquet"))
        image_hw = ds.frames["pixels"].shape[2:4]
        info = _info(ds.meta, fps, len(ds), len(state), len(tasks), state.shape[1], action.shape[1], image_hw)
        (tmp / "meta/info.json").write_text(json.dumps(info, indent=2))
        stats = {"observation.state": _stats(state), "action": _stats(action)}
        (tmp / "meta/stats.json").write_text(json.dumps(stats, indent=2))
    if out.exists():
        out.rmdir()  # checked empty above
    os.replace(tmp, out)  # the export appears whole or not at all
    return out


def import_lerobot(in_dir: str | os.PathLike, dataset_path: str | os.PathLike,
                   image_size: int | None = None) -> int:
    """Append the episodes of the LeRobot v3.0 dataset in `in_dir` to our dataset file.

    `image_size` resizes frames to image_size x image_size (our models see 64x64); None keeps
    them. Returns the number of episodes imported.
    """
    root = Path(in_dir)
    info = _read_info(root)
    fps = float(info["fps"])
    cameras = [k[len(IMAGE_KEY):] for k, f in info["features"].items()
               if k.startswith(IMAGE_KEY) and f.get("dtype") == "video"]
    if not cameras:
        raise DatasetError(f"{root}: no video features named {IMAGE_KEY}<camera>; only video datasets import")
    for key in ("observation.state", "action"):
        if key not in info["features"]:
            raise DatasetError(f"{root}: feature {key!r} missing from meta/info.json")
    episodes = pq.read_table(_existing(root / EPISODES_PATH, root)).to_pylist()
    stats = json.loads((root / "meta/stats.json").read_text()) if (root / "meta/stats.json").exists() else {}
    action_stats = stats.get("action", {})
    width = info["features"]["action"]["shape"][0]
    meta = DatasetMeta(env_id=str(info.get("foresight_env_id") or f"lerobot:{root.name}"),
                       env_options=info.get("foresight_env_options", {}), control_hz=fps,
                       action_low=np.asarray(action_stats.get("min", [-np.inf] * width), np.float32),
                       action_high=np.asarray(action_stats.get("max", [np.inf] * width), np.float32),
                       cameras=tuple(cameras))
    tables: dict[tuple[int, int], dict] = {}
    videos: dict[tuple[str, int, int], np.ndarray] = {}
    with EpisodeWriter(dataset_path, meta) as writer:
        for ep in sorted(episodes, key=lambda e: e["episode_index"]):
            key = (int(ep.get("data/chunk_index", 0)), int(ep.get("data/file_index", 0)))
            if key not in tables:
                tables[key] = _read_rows(_existing(root / info["data_path"].format(
                    chunk_index=key[0], file_index=key[1]), root))
            rows = tables[key]
            lo, hi = np.searchsorted(rows["index"], [int(ep["dataset_from_index"]), int(ep["dataset_to_index"])])
            if hi - lo < 2:
                continue  # an episode needs at least one executed action
            state, action = rows["observation.state"][lo:hi], rows["action"][lo:hi - 1]
            local = range(lo, hi)
            views = []
            for camera in cameras:
                vkey = IMAGE_KEY + camera
                vfile = (vkey, int(ep[f"videos/{vkey}/chunk_index"]), int(ep[f"videos/{vkey}/file_index"]))
                if vfile not in videos:
                    videos[vfile] = _read_video(_existing(root / info["video_path"].format(
                        video_key=vkey, chunk_index=vfile[1], file_index=vfile[2]), root), image_size)
                first = int(round(float(ep[f"videos/{vkey}/from_timestamp"]) * fps))
                views.append(videos[vfile][first:first + len(local)])
            if any(len(v) != len(local) for v in views):
                raise DatasetError(f"{root}: episode {ep['episode_index']} has {len(local)} rows but fewer "
                                   f"video frames; the dataset is incomplete")
            task_spec = ep.get("foresight/task")
            writer.append(Episode(
                pixels=np.stack(views, axis=1), state=state, action=action,
                instruction=(ep.get("tasks") or [""])[0], task=json.loads(task_spec) if task_spec else {},
                success=bool(ep.get("foresight/success", False)), seed=int(ep.get("foresight/seed", -1)),
                policy=str(ep.get("foresight/policy") or "lerobot")))
    return len(episodes)


# ------------------------------------------------------------------------------- internals
def _rows_and_episodes(ds: EpisodeDataset, task_index: dict[str, int], fps: float):
    rows: dict[str, list] = {k: [] for k in ("timestamp", "frame_index", "episode_index", "index",
                                              "task_index", "observation.state", "action")}
    episodes, cursor = [], 0
    for i in range(len(ds)):
        ep = ds.episode(i)
        n = len(ep.pixels)
        action = np.zeros((n, ep.action.shape[1]), np.float32)
        action[:-1] = ep.action
        rows["timestamp"].append((np.arange(n) / fps).astype(np.float32))
        rows["frame_index"].append(np.arange(n, dtype=np.int64))
        rows["episode_index"].append(np.full(n, i, np.int64))
        rows["index"].append(np.arange(cursor, cursor + n, dtype=np.int64))
        rows["task_index"].append(np.full(n, task_index[ep.instruction], np.int64))
        rows["observation.state"].append(ep.state)
        rows["action"].append(action)
        row = {"episode_index": i, "tasks": [ep.instruction], "length": n, "data/chunk_index": 0,
               "data/file_index": 0, "dataset_from_index": cursor, "dataset_to_index": cursor + n}
        for camera in ds.meta.cameras:
            vkey = IMAGE_KEY + camera
            row.update({f"videos/{vkey}/chunk_index": 0, f"videos/{vkey}/file_index": 0,
                        f"videos/{vkey}/from_timestamp": cursor / fps,
                        f"videos/{vkey}/to_timestamp": (cursor + n) / fps})
        row.update({"foresight/success": ep.success, "foresight/seed": ep.seed,
                    "foresight/policy": ep.policy, "foresight/task": json.dumps(ep.task)})
        episodes.append(row)
        cursor += n
    return rows, episodes


def _info(meta: DatasetMeta, fps, n_episodes, n_frames, n_tasks, state_dim, action_dim, image_hw) -> dict:
    h, w = (int(v) for v in image_hw)
    features = {
        IMAGE_KEY + c: {"dtype": "video", "shape": [h, w, 3], "names": ["height", "width", "channels"],
                        "info": {"video.height": h, "video.width": w, "video.codec": "h264",
                                 "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "video.fps": fps,
                                 "video.channels": 3, "has_audio": False}}
        for c in meta.cameras}
    features["observation.state"] = {"dtype": "float32", "shape": [state_dim], "names": None}
    features["action"] = {"dtype": "float32", "shape": [action_dim], "names": None}
    for name, dtype in (("timestamp", "float32"), ("frame_index", "int64"), ("episode_index", "int64"),
                        ("index", "int64"), ("task_index", "int64")):
        features[name] = {"dtype": dtype, "shape": [1], "names": None}
    return {"codebase_version": CODEBASE_VERSION, "robot_type": meta.env_id, "total_episodes": n_episodes,
            "total_frames": n_frames, "total_tasks": n_tasks, "chunks_size": 1000,
            "data_files_size_in_mb": 100, "video_files_size_in_mb": 500, "fps": fps,
            "splits": {"train": f"0:{n_episodes}"}, "data_path": DATA_PATH, "video_path": VIDEO_PATH,
            "features": features, "foresight_env_id": meta.env_id, "foresight_env_options": meta.env_options}


def _read_info(root: Path) -> dict:
    path = root / "meta" / "info.json"
    if not path.exists():
        raise DatasetError(f"{root} is not a LeRobot dataset: {path} is missing")
    info = json.loads(path.read_text())
    if not str(info.get("codebase_version", "")).startswith("v3"):
        raise DatasetError(f"{root} is a LeRobot {info.get('codebase_version')} dataset; only v3.x imports "
                           f"(convert it with LeRobot's convert_dataset_v21_to_v30 first)")
    return info


def _existing(path: Path, root: Path) -> Path:
    if not path.exists():
        raise DatasetError(f"{root}: {path.relative_to(root)} is missing; the dataset is incomplete")
    return path


def _read_rows(path: Path) -> dict[str, np.ndarray]:
    """The index, state and action columns of a data file, sorted by global index."""
    table = pq.read_table(path, columns=["index", "observation.state", "action"])
    index = table.column("index").to_numpy()
    order = np.argsort(index, kind="stable")
    out = {"index": index[order]}
    for name in ("observation.state", "action"):
        out[name] = np.asarray(table.column(name).to_pylist(), np.float32)[order]
    return out


def _list_column(values: np.ndarray):
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), pa.float32()), values.shape[1])


def _stats(x: np.ndarray) -> dict[str, list[float]]:
    return {"mean": x.mean(0).tolist(), "std": x.std(0).tolist(), "min": x.min(0).tolist(),
            "max": x.max(0).tolist(), "count": [len(x)]}


def _mkparent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _write_video(path: Path, episodes, fps: float, quality: int) -> None:
    import imageio.v2 as imageio

    with imageio.get_writer(_mkparent(path), format="FFMPEG", fps=fps, codec="libx264", quality=quality,
                            macro_block_size=1) as writer:
        for frames in episodes:
            for frame in frames:
                writer.append_data(frame)


def _read_video(path: Path, image_size: int | None) -> np.ndarray:
    import imageio.v2 as imageio

    reader = imageio.get_reader(path, format="FFMPEG")
    frames = list(reader.iter_data())  # len(reader) may be inf: iterate instead
    reader.close()
    if image_size is not None:
        from PIL import Image

        frames = [np.asarray(Image.fromarray(f).resize((image_size, image_size), Image.BILINEAR))
                  for f in frames]
    return np.stack(frames).astype(np.uint8)
