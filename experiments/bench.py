"""`foresight-bench SUITE`: speed and memory, measured rather than asserted in tests.

    foresight-bench env                 # tabletop steps/s with 64x64 rendering, on one core
    foresight-bench env --repeats 10 --out outputs/bench/env.json
    foresight-bench env --env-id foresight/MetaWorld-reach-v3-v0 --steps 300
    foresight-bench data                # training windows/s from a cached 64x64 dataset
    foresight-bench world_model         # imagined chunk-steps/s for 1024 candidates x H=4, training speed
    foresight-bench vla                 # ms for 1 and for 64 candidate chunks, training samples/s
    foresight-bench planner             # ms per replan of every mode, pytorch-mppi and nevergrad CMA beside ours
    foresight-bench planner --checkpoints checkpoints/tabletop --replans 100

Each suite runs `--repeats` times; the table and the JSON give min/median/max per metric.
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


def bench_world_model(args) -> dict[str, tuple[float, str]]:
    """One repeat of the world-model suite: imagined chunk-steps/s for the planner's batch, its FLOPs
    beside the measured matmul peak, encoding latency, and training windows/s with peak memory."""
    import resource

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from models import WorldModel, WorldModelConfig
    from models.objectives import WorldModelLossConfig, WorldModelObjective

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model = (WorldModel.load(args.checkpoint) if os.path.exists(args.checkpoint)
             else WorldModel(WorldModelConfig())).eval()
    cfg, m, h = model.cfg, args.candidates, args.plan_horizon
    g = torch.Generator().manual_seed(0)
    z = torch.randn(m, cfg.history, cfg.latent_dim, generator=g)
    chunks = torch.rand(m, h, cfg.chunk, cfg.action_dim, generator=g) * 2 - 1
    lang = torch.randn(1, 384, generator=g)
    out: dict[str, tuple[float, str]] = {}
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            model.rollout(z, chunks, lang)
        flops_per_step = counter.get_total_flops() / (m * h)
        seconds = _median_time(lambda: model.rollout(z, chunks, lang), args.min_time)
        a = torch.randn(2048, 2048, generator=g)
        peak = 2 * 2048 ** 3 / _median_time(lambda: a @ a, args.min_time)
        frame = torch.randint(0, 256, (1, cfg.history, cfg.cameras, cfg.image_size, cfg.image_size, 3),
                              dtype=torch.uint8, generator=g)
        state = torch.zeros(1, cfg.history, cfg.state_dim)
        encode_ms = _median_time(lambda: model.encode(frame, state), args.min_time) * 1e3
    out["chunk_steps_per_s"] = (m * h / seconds, "chunk-steps/s")
    out["rollout_ms"] = (seconds * 1e3, f"ms for {m}x{h}")
    out["flops_per_chunk_step"] = (flops_per_step, "FLOP")
    out["matmul_peak_gflops"] = (peak / 1e9, "GFLOP/s")
    out["fraction_of_matmul_peak"] = (flops_per_step * m * h / seconds / peak, "")
    out["encode_ms"] = (encode_ms, f"ms for {cfg.history} frames")

    train_model = WorldModel(WorldModelConfig(**{**cfg.to_dict(), "ema_target": False})).train()
    objective = WorldModelObjective(train_model, WorldModelLossConfig())
    b, horizon = args.train_batch, args.horizon
    px = lambda t: torch.randint(0, 256, (b, t, cfg.cameras, cfg.image_size, cfg.image_size, 3),  # noqa: E731
                                 dtype=torch.uint8, generator=g)
    batch = dict(pixels=px(cfg.history), state=torch.randn(b, cfg.history, cfg.state_dim, generator=g),
                 actions=torch.rand(b, horizon, cfg.chunk, cfg.action_dim, generator=g) * 2 - 1,
                 future_pixels=px(horizon), future_state=torch.randn(b, horizon, cfg.state_dim, generator=g),
                 lang=torch.randn(b, 384, generator=g))
    out["train_windows_per_s"] = (b / _train_step_seconds(lambda: objective(**batch, generator=g)["loss"],
                                                            train_model, args.min_time), "windows/s")
    out["peak_rss_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "MB")
    return out


def bench_vla(args) -> dict[str, tuple[float, str]]:
    """One repeat of the VLA suite: latency of 1 and 64 candidate chunks for one observation (the
    backbone runs once, the action expert per candidate), and training samples/s with peak memory."""
    import resource

    import torch

    from models.vla import VLA, VLAConfig

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model = (VLA.load(args.vla_checkpoint) if os.path.exists(args.vla_checkpoint)
             else VLA(VLAConfig(backbone="cnn"))).eval()
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    pixels = lambda b: torch.randint(0, 256, (b, cfg.cameras, cfg.image_size, cfg.image_size, 3),  # noqa: E731
                                     dtype=torch.uint8, generator=g)
    batch = {"pixels": pixels(1), "state": torch.randn(1, cfg.state_dim, generator=g),
             "lang": torch.randn(1, 384, generator=g)}
    if cfg.blank_words:  # the instruction with the names of things blanked, which its policy head reads
        batch["head_lang"] = torch.randn(1, 384, generator=g)
    ms = {n: _median_time(lambda: model.sample_chunks(batch, n, g), args.min_time) * 1e3 for n in (1, 64)}
    out = {"sample_ms_n1": (ms[1], "ms for 1 chunk"), "sample_ms_n64": (ms[64], "ms for 64 chunks"),
           "ratio_n64_to_n1": (ms[64] / ms[1], "x")}

    train_model = VLA(cfg).train()
    b = args.train_batch
    seen = b if args.perception_batch is None else args.perception_batch  # windows whose pixels the CNN sees
    data = {"pixels": pixels(seen), "state": torch.randn(b, cfg.state_dim, generator=g),
            "lang": torch.randn(b, 384, generator=g), "actions": torch.rand(b, cfg.chunk, cfg.action_dim, generator=g) * 2 - 1}
    if cfg.blank_words:
        data["head_lang"] = torch.randn(b, 384, generator=g)
    if cfg.where_weight > 0:  # the where targets (the policy's points, with true_points)
        data["where"] = torch.rand(b, cfg.language_points, 2, generator=g) * 1.6 - 0.8
    out["train_samples_per_s"] = (b / _train_step_seconds(lambda: train_model(**data, generator=g)["loss"],
                                                            train_model, args.min_time), "samples/s")
    out["peak_rss_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "MB")
    return out


def bench_planner(args) -> dict[str, tuple[float, str]]:
    """One repeat of the planner suite: ms per replan of every mode on real tabletop observations
    with the shipped checkpoints, then two reference optimizers on the same world model, objective
    and observations: pytorch-mppi against our MPPI, nevergrad's CMA against our CEM."""
    import envs  # first: it selects headless EGL before mujoco is imported
    import torch

    from models import WorldModel
    from models.done import DoneModel
    from models.goal import GoalModel
    from models.vla import VLA
    from planner import MODES, ForesightController, PlannerConfig

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    path = lambda name: os.path.join(args.checkpoints, name)  # noqa: E731
    wm, goal_model, vla = WorldModel.load(path("world_model")), GoalModel.load(path("goal")), VLA.load(path("vla"))
    done = DoneModel.load(path("done")) if os.path.isdir(path("done")) else None
    env = envs.make_env(image_size=wm.cfg.image_size)
    out: dict[str, tuple[float, str]] = {}
    optimizers, observations = {}, []
    with torch.no_grad():
        for mode in MODES:
            controller = ForesightController(PlannerConfig(mode=mode), wm, goal_model, vla, done_model=done)
            plans = _replans(env, controller, args.replans, observations if mode == "cem" else None)
            ms = [p.time_ms for p in plans]
            out[f"{mode}_ms_median"] = (float(np.median(ms)), "ms/replan")
            out[f"{mode}_ms_p95"] = (float(np.percentile(ms, 95)), "ms/replan")
            out[f"{mode}_rollouts"] = (float(np.mean([p.evaluations for p in plans])), "rollouts/replan")
            optimizers[mode] = controller.optimizer
        picks = np.linspace(0, len(observations) - 1, min(args.observations, len(observations))).round()
        out.update(_reference_optimizers(wm, goal_model, [observations[int(i)] for i in picks],
                                         optimizers["mppi"], optimizers["cem"], PlannerConfig()))
    env.close()
    return out


def _replans(env, controller, n: int, observations: list | None = None) -> list:
    """Run push_to_pad evaluation episodes until `controller` has replanned n times after a warm-up
    replan; its PlanInfos. observations, if given, collects (z_hist, lang) at every counted replan."""
    import envs

    plans, episode = [], 0
    while len(plans) <= n:
        obs, _ = env.reset(seed=envs.EVAL_SEED_START + episode, options={"task": "push_to_pad"})
        controller.reset(obs["instruction"], seed=episode)
        done = False
        while not done and len(plans) <= n:
            action = controller.act(obs)
            if controller.last_plan is not (plans[-1] if plans else None):
                plans.append(controller.last_plan)
                if observations is not None and len(plans) > 1:
                    observations.append((controller._history(), controller.lang))
            obs, _, terminated, truncated, _ = env.step(action)
            done = terminated or truncated
        episode += 1
    return plans[1:]  # the first replan pays for lazy initialisation


def _reference_optimizers(wm, goal_model, observations, mppi, cem, cfg) -> dict[str, tuple[float, str]]:
    """Plans from each observation by ours and by a reference optimizer, from the same Proposal (mean
    zeros, std init_std) and seed: {reference}_time_ratio (total time, reference / ours) and
    {reference}_cost_ratio (mean objective cost of the returned plans, reference / ours)."""
    import torch

    from planner import Goal, NevergradOptimizer, Objective, Proposal

    totals = {name: np.zeros(2) for name in ("mppi", "pytorch_mppi", "cem", "ng_cma")}  # seconds, cost
    for i, (z_hist, lang) in enumerate([observations[0], *observations]):  # i = 0: an uncounted warm-up
        objective = Objective(wm, z_hist, lang, Goal.from_model(goal_model, lang, z_hist[:, -1]), cfg.cost)
        mean = torch.zeros(cfg.horizon, wm.cfg.chunk, wm.cfg.action_dim)
        init = Proposal(mean, torch.full_like(mean, cfg.init_std))
        seed = lambda: torch.Generator().manual_seed(i)  # noqa: E731
        ours_mppi, mppi_s = _timed(lambda: mppi.optimize(objective, init, seed()))
        samples = ours_mppi.evaluations // ours_mppi.iterations
        # pytorch-mppi's λ is in cost units: our MPPI's temperature times the Proposal's cost spread (untimed).
        lambda_ = cfg.temperature * float(objective(init.mean + init.std * torch.randn(
            samples, *mean.shape, generator=seed())).std())
        ref_mppi, ref_mppi_s = _timed(lambda: _pytorch_mppi(objective, init, samples, ours_mppi.iterations,
                                                            lambda_, seed=i))
        ours_cem, cem_s = _timed(lambda: cem.optimize(objective, init, seed()))
        ng_cma, ng_s = _timed(lambda: NevergradOptimizer("CMA", ours_cem.evaluations, batch=cfg.population)
                              .optimize(objective, init, seed()))
        plans = {"mppi": (ours_mppi.actions, mppi_s), "pytorch_mppi": (ref_mppi, ref_mppi_s),
                 "cem": (ours_cem.actions, cem_s), "ng_cma": (ng_cma.actions, ng_s)}
        if i:
            for name, (actions, seconds) in plans.items():
                totals[name] += (seconds, float(objective(actions[None])[0]))
    ratio = lambda ref, ours, k: float(totals[ref][k] / totals[ours][k])  # noqa: E731
    return {"pytorch_mppi_time_ratio": (ratio("pytorch_mppi", "mppi", 0), "x our mppi"),
            "pytorch_mppi_cost_ratio": (ratio("pytorch_mppi", "mppi", 1), "x our mppi"),
            "ng_cma_time_ratio": (ratio("ng_cma", "cem", 0), "x our cem"),
            "ng_cma_cost_ratio": (ratio("ng_cma", "cem", 1), "x our cem")}


def _timed(fn: Callable) -> tuple:
    """(fn(), seconds it took)."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def _pytorch_mppi(objective, init, samples: int, iterations: int, lambda_: float, seed: int):
    """pytorch-mppi with the world model as its dynamics: state = the latent history flattened [h·D],
    control = one chunk flattened [K·A], horizon = H chunks, cost = the objective's terminal distance,
    noise = the Proposal's std; `iterations` command() calls without shifting. Its plan [H, K, A]."""
    import torch
    from pytorch_mppi import MPPI

    wm = objective.world_model
    predictor = wm.predictor.for_instruction(objective.lang)  # folded once per plan (ours, once per rollout)
    horizon, k, a = init.mean.shape
    h, d = objective.z_hist.shape[1:]

    def dynamics(state, u):  # [M, h·D], [M, K·A] -> [M, h·D]
        history = state.reshape(-1, h, d)
        z = predictor.rollout(history, u.reshape(-1, 1, k, a))[:, 0]
        return torch.cat([history[:, 1:], z[:, None]], dim=1).flatten(1)

    def terminal_cost(states, actions):  # states [1, M, H, h·D] -> [1, M]
        return objective.goal.cost(states[..., -d:], objective.cfg.distance)[..., -1]

    torch.manual_seed(seed)  # pytorch-mppi draws its noise from the global generator
    bound = torch.ones(k * a)
    mppi = MPPI(dynamics, lambda state, u: state.new_zeros(len(state)), h * d,
                noise_sigma=init.std[0].flatten().pow(2).diag(), num_samples=samples, horizon=horizon,
                device="cpu", terminal_state_cost=terminal_cost, lambda_=lambda_, u_min=-bound, u_max=bound,
                U_init=init.mean.flatten(1).clone())
    for _ in range(iterations):
        mppi.command(objective.z_hist.flatten(), shift_nominal_trajectory=False)
    return mppi.U.view(horizon, k, a)


def _train_step_seconds(loss_fn: Callable, model, min_time: float) -> float:
    """Median seconds of one AdamW step on loss_fn() (forward, backward, update)."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as foresight-train steps

    def step():
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return _median_time(step, min_time)


def _median_time(fn: Callable, min_time: float) -> float:
    """Median seconds per call over at least `min_time` seconds, after two warm-up calls."""
    fn(), fn()
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < min_time or len(times) < 3:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


# suite name -> (function, default cores, what the issue asks of it)
SUITES: dict[str, tuple[Callable, int, str]] = {
    "env": (bench_env, 1, "tabletop steps_per_s >= 500 with 64x64 rendering on one core"),
    "data": (bench_data, 2, "windows_per_s >= 20k at 64x64 from a cached file"),
    "world_model": (bench_world_model, 2, "chunk_steps_per_s >= 200k for 1024 candidates x H=4 on 2 cores"),
    "vla": (bench_vla, 2, "sample_ms_n64 <= 3x sample_ms_n1 (ratio_n64_to_n1 <= 3) on 2 cores"),
    "planner": (bench_planner, 2, "vla_cem_ms_median <= 100 ms per replan on 2 cores"),
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
    parser.add_argument("--checkpoint", default="checkpoints/tabletop/world_model",
                        help="world_model: the model timed (the default config if it does not exist)")
    parser.add_argument("--candidates", type=int, default=1024, help="world_model: candidates per rollout")
    parser.add_argument("--plan-horizon", type=int, default=4, help="world_model: chunks per rollout")
    parser.add_argument("--train-batch", type=int, default=64,
                        help="world_model, vla: windows (samples) per training step")
    parser.add_argument("--perception-batch", type=int, default=None,
                        help="vla: of those, the windows whose pixels the CNN sees (target.perception_batch; default: all)")
    parser.add_argument("--min-time", type=float, default=1.0, help="world_model, vla: seconds per timing")
    parser.add_argument("--vla-checkpoint", default="checkpoints/tabletop/vla",
                        help="vla: the model timed (a random-init cnn VLAConfig if it does not exist)")
    parser.add_argument("--checkpoints", default="checkpoints/tabletop",
                        help="planner: directory with world_model/, goal/ and vla/ checkpoints")
    parser.add_argument("--replans", type=int, default=40, help="planner: replans timed per mode")
    parser.add_argument("--observations", type=int, default=10,
                        help="planner: observations the reference optimizers (pytorch-mppi, nevergrad CMA) plan from")
    parser.add_argument("--cores", type=int, default=None, help="CPU cores to pin to (default: the suite's)")
    parser.add_argument("--out", default=None, help="JSON path (default: outputs/bench/<suite>.json)")
    args = parser.parse_args(argv)
    if min(args.repeats, args.steps, args.replans, args.observations) < 1:
        raise ValueError("--repeats, --steps, --replans and --observations must be at least 1")
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
