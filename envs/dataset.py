"""The episode dataset: one HDF5 file, appended crash-safely, read fast as training windows.

Layout (format "foresight-episodes", version 1), flat as LeRobot lays out its data:

    /                 attrs: format, format_version, env_id, env_options (JSON), control_hz,
                      action_low, action_high, cameras (JSON), stats (JSON, see `stats`)
    /frames/pixels    uint8 [N, V, H, W, 3]   every observation, episodes back to back
    /frames/state     f32   [N, P]
    /frames/action    f32   [N, A]            the action taken at that frame; zeros at an
                                              episode's last frame (nothing was taken there)
    /frames/privileged/<key>  f32 [N, ...]    truth for probes and metrics (NaN-padded)
    /episodes/{start, length, seed, success, instruction, task, policy}
                      one row per complete episode; `length` T counts actions, so the episode
                      holds T + 1 frames from `start` (its final frame is the outcome)

Crash safety: the writer appends in SWMR mode, frames first and the episode row last, flushing
each. A process killed mid-write leaves every episode with a row intact and readable (rows are
the commit marker). HDF5 then refuses to reopen the file for writing, so resuming copies the
complete episodes into a fresh file and swaps it in atomically.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

FORMAT = "foresight-episodes"
FORMAT_VERSION = 1
_STR = {"instruction": "S256", "task": "S2048", "policy": "S64"}  # SWMR cannot append vlen strings


class DatasetError(ValueError):
    """A dataset file that is missing, truncated, foreign or inconsistent with what was asked."""


@dataclass
class DatasetMeta:
    """What every episode in a dataset shares."""

    env_id: str
    env_options: dict[str, Any]
    control_hz: float
    action_low: np.ndarray
    action_high: np.ndarray
    cameras: tuple[str, ...]


@dataclass
class Episode:
    """One recorded episode of T actions and T + 1 observations."""

    pixels: np.ndarray  # uint8 [T+1, V, H, W, 3]
    state: np.ndarray  # f32 [T+1, P]
    action: np.ndarray  # f32 [T, A]
    instruction: str
    task: dict[str, Any]
    success: bool
    seed: int
    policy: str
    privileged: dict[str, np.ndarray] = field(default_factory=dict)  # key -> [T+1, ...]

    def __len__(self) -> int:
        return len(self.action)


class EpisodeWriter:
    """Appends episodes to a dataset file, creating it or resuming it (see the module doc)."""

    def __init__(self, path: str | os.PathLike, meta: DatasetMeta,
                 privileged_shapes: dict[str, tuple[int, ...]] | None = None):
        self.path = Path(path)
        self.meta = meta
        self.privileged_shapes = dict(privileged_shapes or {})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._file = _open_for_append(self.path)
            _check_same_meta(self._file, meta, self.path)
        else:
            self._file = None  # created with the first episode, once frame shapes are known
        self._n_written = 0

    # ---------------------------------------------------------------------------------- API
    def done_seeds(self) -> set[int]:
        """Seeds of the complete episodes already in the file (for resuming a collection)."""
        if self._file is None:
            return set()
        return set(int(s) for s in self._file["episodes/seed"][:])

    def append(self, episode: Episode) -> None:
        _check_episode(episode, self.meta)
        if self._file is None:
            self._file = _create(self.path, self.meta, episode, self.privileged_shapes)
        f = self._file
        frames = f["frames"]
        start = int(f["episodes/start"][-1] + f["episodes/length"][-1] + 1) if len(f["episodes/start"]) else 0
        n = len(episode.pixels)
        action = np.zeros((n, episode.action.shape[1]), np.float32)
        action[:-1] = episode.action
        columns = {"pixels": episode.pixels, "state": episode.state, "action": action}
        for key, shape in self.privileged_shapes.items():
            columns[f"privileged/{key}"] = _pad(episode.privileged[key], (n, *shape))
        for name, values in columns.items():  # frames first ...
            ds = frames[name]
            ds.resize(start + n, axis=0)  # also drops frames of an episode cut short by a crash
            ds[start:start + n] = values
            ds.flush()
        row = {"start": start, "length": len(episode), "seed": episode.seed, "success": episode.success,
               "instruction": episode.instruction.encode(), "task": json.dumps(episode.task).encode(),
               "policy": episode.policy.encode()}
        _check_strings(row)
        for name, value in row.items():  # ... then the row that makes the episode count
            ds = f["episodes"][name]
            ds.resize(ds.shape[0] + 1, axis=0)
            ds[-1] = value
            ds.flush()
        self._n_written += 1

    def close(self) -> None:
        """Finish the file and store state/action statistics over all its episodes."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        with _open_when_unlocked(self.path) as f:
            f.attrs["stats"] = json.dumps(_compute_stats(f))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class EpisodeDataset:
    """Read access to a dataset file: metadata, statistics, episodes, frames.

    `load=True` reads all frames into memory once (decompressing them), which is what fast
    window sampling (`WindowSampler`) wants; otherwise reads go to the file.
    """

    def __init__(self, path: str | os.PathLike, load: bool = False):
        self.path = Path(path)
        self._file = _open_for_read(self.path)
        f = self._file
        self.meta = DatasetMeta(
            env_id=str(f.attrs["env_id"]), env_options=json.loads(f.attrs["env_options"]),
            control_hz=float(f.attrs["control_hz"]), action_low=np.asarray(f.attrs["action_low"]),
            action_high=np.asarray(f.attrs["action_high"]), cameras=tuple(json.loads(f.attrs["cameras"])))
        episodes = f["episodes"]
        n_eps = _complete_rows(episodes)
        self.starts = episodes["start"][:n_eps].astype(np.int64)
        self.lengths = episodes["length"][:n_eps].astype(np.int64)
        self.seeds = episodes["seed"][:n_eps].astype(np.int64)
        self.success = episodes["success"][:n_eps].astype(bool)
        self.instructions = [s.decode() for s in episodes["instruction"][:n_eps]]
        self.policies = [s.decode() for s in episodes["policy"][:n_eps]]
        self._tasks = episodes["task"][:n_eps]
        n_frames = int(self.starts[-1] + self.lengths[-1] + 1) if len(self.starts) else 0
        frames = f["frames"]
        if frames["pixels"].shape[0] < n_frames:
            raise DatasetError(f"{self.path}: the episode table needs {n_frames} frames but the file holds "
                               f"{frames['pixels'].shape[0]}; the file is damaged, recollect it")
        names = ["pixels", "state", "action"] + [f"privileged/{k}" for k in frames.get("privileged", {})]
        self.frames: dict[str, Any] = {
            name: frames[name][:n_frames] if load else frames[name] for name in names}
        stats = f.attrs.get("stats")
        self.stats = json.loads(stats) if stats is not None else _compute_stats(f, n_frames)

    def __len__(self) -> int:
        return len(self.starts)

    def task(self, i: int) -> dict[str, Any]:
        return json.loads(self._tasks[i])

    def episode(self, i: int) -> Episode:
        if not -len(self) <= i < len(self):
            raise IndexError(f"episode {i} out of range: the dataset has {len(self)}")
        i %= len(self)
        lo, n = int(self.starts[i]), int(self.lengths[i])
        frames = {name: np.asarray(ds[lo:lo + n + 1]) for name, ds in self.frames.items()}
        return Episode(pixels=frames["pixels"], state=frames["state"], action=frames["action"][:n],
                       instruction=self.instructions[i], task=self.task(i), success=bool(self.success[i]),
                       seed=int(self.seeds[i]), policy=self.policies[i],
                       privileged={k.split("/", 1)[1]: v for k, v in frames.items() if k.startswith("privileged/")})

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class Windows:
    """A batch of training windows (B windows; h history frames; H chunks of K actions)."""

    pixels: np.ndarray  # uint8 [B, h, V, H, W, 3]: observations up to and including t
    state: np.ndarray  # f32 [B, h, P]
    actions: np.ndarray  # f32 [B, H, K, A]: the actions taken from t on
    future_pixels: np.ndarray  # uint8 [B, H, V, H, W, 3]: observation after each chunk (targets only)
    future_state: np.ndarray  # f32 [B, H, P]
    episode: np.ndarray  # i64 [B]: episode index (for its instruction and task)
    t: np.ndarray  # i64 [B]: frame index of t within its episode
    action_pad: np.ndarray  # bool [B, H·K]: the action lies past the episode's end (a copy; pad_end only)


class WindowSampler:
    """Random training windows from an in-memory dataset, gathered with vectorised indexing.

    A window at frame t of an episode needs `history` frames ending at t, `stride` frames apart
    (a world model whose history is one latent per chunk wants stride = chunk), and `horizon`
    chunks of `chunk` actions after it, all inside the episode. `episodes` (indices) restricts the
    windows to those episodes (say, the successful expert ones).

    With `pad_end` a window may run past the episode's end, so that its last frames are trained on
    too (a policy must learn how an episode finishes): it needs one action after t, the missing
    actions repeat the last one and are flagged in `action_pad` (mask them out of a loss, as
    LeRobot's `action_is_pad`), and the missing future frames repeat the final frame.
    """

    def __init__(self, dataset: EpisodeDataset, history: int, horizon: int, chunk: int, stride: int = 1,
                 episodes: np.ndarray | None = None, pad_end: bool = False):
        if min(history, horizon, chunk, stride) < 1:
            raise ValueError(f"history, horizon, chunk and stride must be >= 1, got "
                             f"{history}, {horizon}, {chunk}, {stride}")
        if not isinstance(dataset.frames["pixels"], np.ndarray):
            raise ValueError("WindowSampler needs the frames in memory: open the dataset with load=True")
        self.ds, self.history, self.horizon, self.chunk = dataset, history, horizon, chunk
        span = horizon * chunk
        # Every valid (episode, t): t >= (history - 1) * stride and t + span <= length (t < length with pad_end).
        first, last = (history - 1) * stride, dataset.lengths - (1 if pad_end else span)
        counts = np.clip(last - first + 1, 0, None)
        if episodes is not None:
            counts[np.setdiff1d(np.arange(len(dataset)), episodes)] = 0
        if counts.sum() == 0:
            raise ValueError(f"no episode is long enough for history {history} + {horizon} chunks of {chunk} "
                             f"actions (longest: {dataset.lengths.max() if len(dataset) else 0} actions)")
        self.episode_of = np.repeat(np.arange(len(dataset)), counts)
        offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        self.t_of = first + offsets
        self._hist = np.arange(-history + 1, 1) * stride
        self._future = np.arange(1, horizon + 1) * chunk
        self._acts = np.arange(span)

    def __len__(self) -> int:
        return len(self.t_of)

    def sample(self, rng: np.random.Generator, batch: int) -> Windows:
        pick = rng.integers(len(self), size=batch)
        episode, t = self.episode_of[pick], self.t_of[pick]
        start, length = self.ds.starts[episode][:, None], self.ds.lengths[episode][:, None]
        now = start + t[:, None]
        f = self.ds.frames
        acts = np.minimum(t[:, None] + self._acts, length - 1)  # within the episode unless pad_end
        future = start + np.minimum(t[:, None] + self._future, length)  # frame `length` follows the last action
        actions = f["action"][start + acts]
        return Windows(
            pixels=f["pixels"][now + self._hist], state=f["state"][now + self._hist],
            actions=actions.reshape(batch, self.horizon, self.chunk, -1),
            future_pixels=f["pixels"][future], future_state=f["state"][future],
            episode=episode, t=t, action_pad=t[:, None] + self._acts >= length)


# ------------------------------------------------------------------------------- internals
def _create(path: Path, meta: DatasetMeta, first: Episode, privileged_shapes) -> h5py.File:
    tmp = path.with_name(path.name + ".creating")
    f = h5py.File(tmp, "w", libver="latest")
    f.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION, "env_id": meta.env_id,
                    "env_options": json.dumps(meta.env_options), "control_hz": meta.control_hz,
                    "action_low": np.asarray(meta.action_low, np.float32),
                    "action_high": np.asarray(meta.action_high, np.float32),
                    "cameras": json.dumps(list(meta.cameras))})
    frame_shape = first.pixels.shape[1:]
    frames = f.create_group("frames")
    frames.create_dataset("pixels", (0, *frame_shape), maxshape=(None, *frame_shape), dtype=np.uint8,
                          chunks=(8, *frame_shape), compression="lzf")
    for name, width in (("state", first.state.shape[1]), ("action", first.action.shape[1])):
        frames.create_dataset(name, (0, width), maxshape=(None, width), dtype=np.float32, chunks=(1024, width))
    for key, shape in privileged_shapes.items():
        frames.create_dataset(f"privileged/{key}", (0, *shape), maxshape=(None, *shape), dtype=np.float32,
                              chunks=(1024, *shape))
    episodes = f.create_group("episodes")
    for name, dtype in (("start", np.int64), ("length", np.int64), ("seed", np.int64), ("success", bool),
                        *((k, v) for k, v in _STR.items())):
        episodes.create_dataset(name, (0,), maxshape=(None,), dtype=dtype, chunks=(256,))
    f.close()
    os.replace(tmp, path)  # the file appears whole, with its layout, or not at all
    return _open_for_append(path)


def _open_for_append(path: Path) -> h5py.File:
    _open_for_read(path).close()  # a clear error for foreign or damaged files
    try:
        f = _open_when_unlocked(path)
    except OSError as err:
        if "already open for write" not in str(err):
            raise DatasetError(f"cannot open {path} for appending: {err}") from err
        _recover(path)  # a writer was killed: keep the complete episodes
        f = h5py.File(path, "a", libver="latest")
    f.swmr_mode = True
    return f


def _open_when_unlocked(path: Path, wait_s: float = 10.0) -> h5py.File:
    """Open for writing, waiting while a reader holds the file's lock: a reader that opens the file
    in the instant between its creation (or the last episode) and this open would otherwise kill
    the writer."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return h5py.File(path, "a", libver="latest")
        except BlockingIOError:  # errno 11: locked by a reader, for as long as one read takes
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _complete_rows(episodes: h5py.Group) -> int:
    """Rows present in every column of the episode table.

    The writer grows the columns one after another, so a reader (or a crash) can catch the table
    with a row in some columns only; that row is not committed yet.
    """
    return min(ds.shape[0] for ds in episodes.values())


def _recover(path: Path) -> None:
    """Rewrite a file whose writer died, keeping exactly its complete episodes."""
    tmp = path.with_name(path.name + ".recovering")
    with h5py.File(path, "r", libver="latest", swmr=True) as src, h5py.File(tmp, "w", libver="latest") as dst:
        n_eps = _complete_rows(src["episodes"])
        n_frames = int(src["episodes/start"][n_eps - 1] + src["episodes/length"][n_eps - 1] + 1) if n_eps else 0
        dst.attrs.update(dict(src.attrs))

        def copy(name, obj):
            if isinstance(obj, h5py.Dataset):
                n = n_frames if name.startswith("frames/") else n_eps
                out = dst.create_dataset(name, (n, *obj.shape[1:]), maxshape=obj.maxshape, dtype=obj.dtype,
                                         chunks=obj.chunks, compression=obj.compression)
                for lo in range(0, n, 4096):
                    out[lo:min(n, lo + 4096)] = obj[lo:min(n, lo + 4096)]
        src.visititems(copy)
    os.replace(tmp, path)


def _open_for_read(path: Path) -> h5py.File:
    if not path.exists():
        raise DatasetError(f"no dataset at {path}; collect one with foresight-collect")
    try:
        try:
            f = h5py.File(path, "r", libver="latest")  # this open also detects truncation
        except OSError as err:
            if "already open for write" not in str(err):
                raise
            # A writer is still appending, or was killed: SWMR reads see its complete episodes.
            f = h5py.File(path, "r", libver="latest", swmr=True)
    except OSError as err:
        raise DatasetError(f"{path} is not a readable HDF5 file ({err}); it may be truncated or "
                           f"not a dataset at all") from err
    if f.attrs.get("format") != FORMAT:
        f.close()
        raise DatasetError(f"{path} is an HDF5 file but not a Foresight episode dataset "
                           f"(its 'format' attribute is not {FORMAT!r})")
    if int(f.attrs["format_version"]) > FORMAT_VERSION:
        f.close()
        raise DatasetError(f"{path} has format version {f.attrs['format_version']}; this code reads up to "
                           f"{FORMAT_VERSION}: update Foresight")
    return f


def _check_same_meta(f: h5py.File, meta: DatasetMeta, path: Path) -> None:
    stored = (str(f.attrs["env_id"]), json.loads(f.attrs["env_options"]), json.loads(f.attrs["cameras"]))
    wanted = (meta.env_id, json.loads(json.dumps(meta.env_options)), list(meta.cameras))
    if stored != wanted:
        raise DatasetError(f"{path} holds episodes of {stored[0]} with options {stored[1]}, not {wanted[0]} "
                           f"with {wanted[1]}; append to a new file instead")


def _check_episode(ep: Episode, meta: DatasetMeta) -> None:
    t = len(ep.action)
    if t < 1 or ep.pixels.shape[0] != t + 1 or ep.state.shape[0] != t + 1:
        raise DatasetError(f"an episode needs T >= 1 actions and T + 1 frames and states; got {t} actions, "
                           f"{ep.pixels.shape[0]} frames, {ep.state.shape[0]} states")
    if ep.pixels.dtype != np.uint8 or ep.pixels.ndim != 5 or ep.pixels.shape[1] != len(meta.cameras):
        raise DatasetError(f"pixels must be uint8 [T+1, {len(meta.cameras)} cameras, H, W, 3]; "
                           f"got {ep.pixels.dtype} {ep.pixels.shape}")


def _check_strings(row: dict) -> None:
    for key, dtype in _STR.items():
        limit = int(dtype[1:])
        if len(row[key]) > limit:
            raise DatasetError(f"episode {key} is {len(row[key])} bytes; the format stores at most {limit}")


def _pad(values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """`values` NaN-padded to `shape` (privileged arrays vary with the number of objects)."""
    values = np.asarray(values, np.float32)
    if values.ndim != len(shape) or any(v > s for v, s in zip(values.shape, shape)):
        raise DatasetError(f"privileged array of shape {values.shape} does not fit the declared {shape}")
    out = np.full(shape, np.nan, np.float32)
    out[tuple(slice(0, v) for v in values.shape)] = values
    return out


def _compute_stats(f: h5py.File, n_frames: int | None = None) -> dict[str, dict[str, list[float]]]:
    """mean/std/min/max of state and action over all frames (actions: real steps only)."""
    eps = f["episodes"]
    rows = _complete_rows(eps)  # a reader can catch the writer between two columns' growth
    starts, lengths = eps["start"][:rows], eps["length"][:rows]
    n = n_frames if n_frames is not None else (int(starts[-1] + lengths[-1] + 1) if rows else 0)
    if n == 0:
        return {}
    state = f["frames/state"][:n]
    action = f["frames/action"][:n]
    last = starts + lengths  # the frame after each episode's final action
    taken = np.ones(n, bool)
    taken[last[last < n]] = False
    out = {}
    for name, x in (("state", state), ("action", action[taken])):
        out[name] = {"mean": x.mean(0).tolist(), "std": x.std(0).tolist(),
                     "min": x.min(0).tolist(), "max": x.max(0).tolist()}
    return out


def dataset_meta(env, env_options: dict[str, Any]) -> DatasetMeta:
    """The dataset metadata for episodes recorded from `env` (made with `env_options`)."""
    base = env.unwrapped
    return DatasetMeta(env_id=env.spec.id if env.spec else type(base).__name__, env_options=env_options,
                       control_hz=float(base.metadata.get("render_fps", 0)),
                       action_low=env.action_space.low, action_high=env.action_space.high,
                       cameras=tuple(base.cameras))


def record_episode(env, policy, seed: int, policy_name: str, options: dict | None = None) -> Episode:
    """Run `policy` for one episode from `seed` and record it. A policy has `reset()` and
    `act(info)`; one that also sees the observation (a learned policy) sets `reads_observation`
    and gets `reset(instruction)` and `act(info, obs)`."""
    obs, info = env.reset(seed=seed, options=options)
    reads_obs = getattr(policy, "reads_observation", False)
    if reads_obs:
        policy.reset(obs["instruction"])
    else:
        policy.reset()
    cameras = env.unwrapped.cameras
    shapes = getattr(env.unwrapped, "privileged_shapes", {})
    pixels, states, actions, infos = [], [], [], []

    def keep(obs, info):
        pixels.append(np.stack([obs["pixels"][c] for c in cameras]))
        states.append(obs["state"])
        infos.append({k: info[k] for k in shapes})

    keep(obs, info)
    done, success = False, False
    while not done:
        action = policy.act(info, obs) if reads_obs else policy.act(info)
        obs, _, success, truncated, info = env.step(action)
        actions.append(action)
        keep(obs, info)
        done = success or truncated
    return Episode(pixels=np.stack(pixels), state=np.stack(states).astype(np.float32),
                   action=np.stack(actions).astype(np.float32), instruction=obs["instruction"],
                   task=info.get("task", {}), success=bool(success), seed=seed, policy=policy_name,
                   privileged={k: np.stack([_pad(i[k], shape) for i in infos]) for k, shape in shapes.items()})

