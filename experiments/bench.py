"""`foresight-bench SUITE`: speed and memory, measured rather than asserted in tests.

    foresight-bench env                 # tabletop steps/s with 64x64 rendering, on one core
    foresight-bench env --repeats 10 --out outputs/bench/env.json
    foresight-bench env --env-id foresight/MetaWorld-reach-v3-v0 --steps 300
    foresight-bench data                # training windows/s from a cached 64x64 dataset

Each suite runs `--repeats` times; the table and the JSON give min/median/max per metric.
Later issues add suites (data, world_model, vla, planner) to SUITES.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Callable

import numpy as np

from experiments.common import clean_errors, format_table, write_json


def bench_env(args) -> dict[str, tuple[float, str]]:
    """One repeat of the environment suite: {metric: (value, unit)}."""
    import envs  # first: it selects headless EGL before mujoco is imported
    import mujoco

    env = envs.make_env(args.env_id, image_size=64)
    base = env.unwrapped
    rng = np.random.default_rng(0)
    act = env.action_space.shape[0]
    env.reset(seed=0)
    for _ in range(20):  # warm-up: GL context, caches
        env.step(rng.uniform(-1, 1, act))

    resets, steps = 0, 0
    start = time.perf_counter()
    reset_time = 0.0
    while steps < args.steps:
        _, _, terminated, truncated, _ = env.step(rng.uniform(-1, 1, act))
        steps += 1
        if terminated or truncated:
            t = time.perf_counter()
            env.reset()
            reset_time += time.perf_counter() - t
            resets += 1
    elapsed = time.perf_counter() - start

    n = min(args.steps, 500)
    t = time.perf_counter()
    for _ in range(n):
        base.render_pixels()
    render_ms = (time.perf_counter() - t) / n * 1e3
    out = {"steps_per_s": (steps / elapsed, "steps/s"), "render_64_ms": (render_ms, "ms"),
           "reset_ms": (reset_time / max(resets, 1) * 1e3, "ms")}
    if hasattr(base, "substeps"):  # tabletop: physics alone, for comparison with rendering
        t = time.perf_counter()
        for _ in range(n):
            mujoco.mj_step(base.model, base.data, nstep=base.substeps)
        out["physics_step_ms"] = ((time.perf_counter() - t) / n * 1e3, "ms")
    env.close()
    return out


DATA_CACHE = os.path.join("outputs", "bench", "data_tabletop.h5")


def bench_data(args) -> dict[str, tuple[float, str]]:
    """One repeat of the dataset suite: loading a cached 64x64 dataset, then sampling windows."""
    import envs
    from envs.dataset import EpisodeDataset, EpisodeWriter, WindowSampler, dataset_meta, record_episode
    from envs.experts import RandomPlay

    if not os.path.exists(DATA_CACHE):  # made once, then reused: "from a cached file"
        env = envs.make_env(image_size=64)
        with EpisodeWriter(DATA_CACHE, dataset_meta(env, {"image_size": 64}),
                           env.unwrapped.privileged_shapes) as writer:
            for seed in range(args.episodes):
                writer.append(record_episode(env, RandomPlay(2, np.random.default_rng(seed)), seed, "random"))
        env.close()
    t = time.perf_counter()
    ds = EpisodeDataset(DATA_CACHE, load=True)
    load_s = time.perf_counter() - t
    sampler = WindowSampler(ds, history=args.history, horizon=args.horizon, chunk=args.chunk)
    rng = np.random.default_rng(0)
    sampler.sample(rng, args.batch)
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < 2.0:
        sampler.sample(rng, args.batch)
        n += args.batch
    windows_per_s = n / (time.perf_counter() - t)
    frames = ds.frames["pixels"].shape[0]
    ds.close()
    return {"windows_per_s": (windows_per_s, "windows/s"), "load_s": (load_s, "s"),
            "frames": (frames, "frames"), "file_mb": (os.path.getsize(DATA_CACHE) / 1e6, "MB")}


# suite name -> (function, default cores, what the issue asks of it)
SUITES: dict[str, tuple[Callable, int, str]] = {
    "env": (bench_env, 1, "tabletop steps_per_s >= 500 with 64x64 rendering on one core"),
    "data": (bench_data, 2, "windows_per_s >= 20k at 64x64 from a cached file"),
}


@clean_errors
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="foresight-bench", description=__doc__.split("\n")[0])
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2000, help="env: steps per repeat")
    parser.add_argument("--env-id", default="foresight/Tabletop-v0",
                        help="env: which environment (e.g. foresight/MetaWorld-reach-v3-v0)")
    parser.add_argument("--episodes", type=int, default=200, help="data: episodes in the cached dataset")
    parser.add_argument("--batch", type=int, default=256, help="data: windows per batch")
    parser.add_argument("--history", type=int, default=2, help="data: history frames per window")
    parser.add_argument("--horizon", type=int, default=4, help="data: chunks per window")
    parser.add_argument("--chunk", type=int, default=8, help="data: actions per chunk")
    parser.add_argument("--cores", type=int, default=None, help="CPU cores to pin to (default: the suite's)")
    parser.add_argument("--out", default=None, help="JSON path (default: outputs/bench/<suite>.json)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.steps < 1:
        raise ValueError("--repeats and --steps must be at least 1")
    run, default_cores, target = SUITES[args.suite]
    cores = args.cores or default_cores
    allowed = sorted(os.sched_getaffinity(0))
    if cores > len(allowed):
        raise ValueError(f"--cores {cores} but only {len(allowed)} are available")
    os.sched_setaffinity(0, allowed[:cores])

    samples: dict[str, list[float]] = {}
    units: dict[str, str] = {}
    for _ in range(args.repeats):
        for name, (value, unit) in run(args).items():
            samples.setdefault(name, []).append(float(value))
            units[name] = unit
    metrics = {name: {"min": min(v), "median": float(np.median(v)), "max": max(v), "unit": units[name],
                      "samples": v} for name, v in samples.items()}
    rows = [(name, f"{m['min']:.3g}", f"{m['median']:.3g}", f"{m['max']:.3g}", m["unit"])
            for name, m in metrics.items()]
    print(f"foresight-bench {args.suite}: {args.repeats} repeats on {cores} core(s); target: {target}")
    print(format_table(["metric", "min", "median", "max", "unit"], rows))
    out = args.out or os.path.join("outputs", "bench", f"{args.suite}.json")
    write_json(out, {"suite": args.suite, "args": vars(args), "cores": cores, "target": target,
                     "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                                 "python": platform.python_version()},
                     "metrics": metrics})
    print(f"results: {out}")


if __name__ == "__main__":
    main()
