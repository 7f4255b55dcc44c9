"""`foresight-horizon`: planning horizon against prediction error (issue 7).

    foresight-horizon                                    # shipped checkpoints; 50 episodes per family and H
    foresight-horizon closed_loop=false +variants.ema=checkpoints/ablations/ema/world_model
    foresight-horizon families=[push_to_pad] episodes=10 horizons=[1,2,4,8]

1. Open loop, for each world-model variant (`variants`) on held-out episodes: the rollout's latent
   error against copying the last latent at each horizon 1..max_horizon chunks, and the linear
   position probe (foresight-evaluate's) on the imagined latents. Few held-out episodes last 16
   chunks, so each horizon h samples its windows among those with h chunks of future inside their
   episode; every variant sees the same windows, and `open_loop.windows` says per horizon how many
   windows, from how many episodes and which task families, the numbers rest on.
2. Closed loop: vla_cem success per planning horizon H, on foresight-control's settings and paired
   seeds, for each world-model variant (with its sibling goal/ and the first VLA variant) and each
   further VLA variant (with the first world-model variant).

Writes horizon.json (every number plotted) and three figures, PNG and PDF, to the run directory.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from experiments.common import CONFIG_DIR, atomic_write, clean_errors, format_table, success_cells, write_json

# Variant name -> the foresight-train overrides that make that ablation (configs/horizon.yaml).
ABLATIONS = {"no_language": "target.model.use_language=false", "ema": "target.loss.regularizer=ema",
             "one_step": "target.loss.multistep=0", "vla_jepa": "target.model.aux_weight=0.5"}


def checkpoint(directory, kind: str, name: str, world_model=None) -> Path:
    """Variant `name`'s `kind` checkpoint directory, or an error naming it and the command that makes it."""
    path = Path(directory)
    if (path / "config.json").is_file():
        return path
    args = [f"target={kind}"]
    if kind != "goal" and name != "default":
        args.append(ABLATIONS.get(name, "<the overrides of this variant>"))
    args += [f"world_model={world_model}"] * (world_model is not None)
    args += [f"target.out={path}", f"hydra.run.dir=outputs/train/{name}_{kind}"]
    raise FileNotFoundError(f"no {kind} checkpoint in {path} (variant {name!r}); make it with "
                            f"`foresight-train {' '.join(args)}`")


def open_loop(cfg: DictConfig, models: dict) -> dict:
    """Rollout error against copy-last and the probe on imagined latents per horizon, per variant."""
    from envs.dataset import WindowSampler
    from envs.scene import TABLE_HALF
    from experiments.evaluate import fit_probes, imagined_probe_errors
    from experiments.targets import instruction_table, open_dataset, rollout_errors, window_tensors

    (k, hist), *others = {(m.cfg.chunk, m.cfg.history) for m in models.values()}
    if others:
        raise ValueError("the world-model variants must share chunk and history to be measured on the same windows")
    train_ds, eval_ds = open_dataset(cfg.data), open_dataset(cfg.eval_data)
    lang, _ = instruction_table(eval_ds)
    width = 2 * TABLE_HALF
    out, probes = {"table_width_m": width, "windows": [], "variants": {}}, {}
    for name, model in models.items():  # the same probe frames for every variant
        probes[name], err, _ = fit_probes(model, train_ds, eval_ds, np.random.default_rng(cfg.sample_seed),
                                          cfg.probe_frames, cfg.probe_alpha)["objects"]
        out["variants"][name] = {"world_model": str(cfg.variants[name]), "rollout": [], "probe": {
            "real_error_m": float(err.mean()), "real_error_of_table_width": float(err.mean() / width), "imagined": []}}
    for h in tqdm(range(1, cfg.max_horizon + 1), desc="open loop", unit="horizon"):
        sampler = WindowSampler(eval_ds, history=hist, horizon=h, chunk=k, stride=k)
        w = sampler.sample(np.random.default_rng([cfg.sample_seed, h]), cfg.windows)
        families = Counter(eval_ds.task(int(e))["family"] for e in w.episode)
        out["windows"].append({"horizon": h, "windows": cfg.windows, "available_windows": len(sampler),
                               "episodes": len(np.unique(sampler.episode_of)), "families": dict(sorted(families.items()))})
        batch = window_tensors(w, lang)
        for name, model in models.items():
            model_err, copy_err, imagined = rollout_errors(model, batch)
            e = imagined_probe_errors(probes[name], eval_ds, w, imagined, k)[-1]
            v = out["variants"][name]
            v["rollout"].append({"horizon": h, "model": model_err[-1], "copy_last": copy_err[-1],
                                 "ratio": model_err[-1] / copy_err[-1]})
            v["probe"]["imagined"].append({"horizon": h, "mean_error_m": float(e.mean()),
                                           "mean_error_of_table_width": float(e.mean() / width)})
    return out


def closed_loop(cfg: DictConfig, lines: dict) -> dict:
    """vla_cem success per planning horizon H for each line (name -> world model, goal, VLA), paired seeds."""
    import envs
    from experiments.control import run_episode, summarise
    from experiments.env_config import env_from_config
    from models.done import DoneModel
    from planner import ForesightController, PlannerConfig

    first_seed = envs.EVAL_SEED_START if cfg.seed is None else int(cfg.seed)
    families = list(cfg.families or cfg.env.tasks)
    planner_cfg = OmegaConf.to_container(cfg.planner, resolve=True)
    env = env_from_config(cfg.env)
    out = {"mode": "vla_cem", "first_seed": first_seed, "families": families, "episodes": int(cfg.episodes),
           "lines": {}}
    total = len(lines) * len(cfg.horizons) * len(families) * cfg.episodes
    with tqdm(total=total, desc="closed loop", unit="ep") as bar:
        for name, (paths, (wm, goal, vla)) in lines.items():
            rows = []
            done_dir = Path(paths["world_model"]).parent / "done"  # the sibling done model, if any
            done = DoneModel.load(done_dir) if done_dir.is_dir() else None
            for horizon in map(int, cfg.horizons):
                controller = ForesightController(PlannerConfig(**{**planner_cfg, "mode": "vla_cem", "horizon": horizon}),
                                                 wm, goal, vla, done_model=done)
                per, everything = {}, []
                for family in families:
                    episodes = []
                    for ep in range(cfg.episodes):
                        episodes.append(run_episode(env, controller, first_seed + ep, family, False)[0])
                        bar.set_postfix(line=name, H=horizon, family=family,
                                        success=f"{sum(e['success'] for e in episodes)}/{len(episodes)}")
                        bar.update()
                    per[family] = {**summarise(episodes), "success": [e["success"] for e in episodes]}
                    everything += episodes
                rows.append({"H": horizon, **summarise(everything), "families": per})
            out["lines"][name] = {**paths, "horizons": rows}
    env.close()
    return out


def figures(results: dict, out: Path) -> list[Path]:
    """(1) error ratio to copy-last, (2) probe error on imagined latents, (3) closed-loop success; PNG + PDF."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = {}
    variants, windows = results["open_loop"]["variants"], results["open_loop"]["windows"]

    def horizon_axis(ax):  # under each horizon: how many held-out episodes are long enough for it
        ax.set_xticks([w["horizon"] for w in windows], [f"{w['horizon']}\n{w['episodes']}" for w in windows],
                      fontsize=7)
        ax.set_xlabel("horizon (chunks) / held-out episodes with that much future")

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, v in variants.items():
        ax.plot([r["horizon"] for r in v["rollout"]], [r["ratio"] for r in v["rollout"]], "o-", ms=3, label=name)
    ax.axhline(1.0, color="k", ls="--", lw=1, label="copy-last")
    ax.set(ylabel="latent MSE / copy-last MSE", title="Open-loop prediction error (held out)")
    horizon_axis(ax)
    figs["rollout_ratio"] = fig
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, (name, v) in enumerate(variants.items()):
        p = v["probe"]
        ax.plot([r["horizon"] for r in p["imagined"]], [100 * r["mean_error_of_table_width"] for r in p["imagined"]],
                "o-", ms=3, color=f"C{i}", label=f"{name}: imagined")
        ax.axhline(100 * p["real_error_of_table_width"], color=f"C{i}", ls=":", label=f"{name}: real latents")
    ax.set(ylabel="probe position error (% of table width)", title="Linear position probe on imagined latents")
    ax.set_ylim(bottom=0)
    horizon_axis(ax)
    figs["probe_imagined"] = fig
    if "closed_loop" in results:
        c = results["closed_loop"]
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for i, (name, line) in enumerate(c["lines"].items()):  # dodged a little so the bars don't overlap
            h = np.array([r["H"] for r in line["horizons"]]) + 0.06 * (i - (len(c["lines"]) - 1) / 2)
            rate = np.array([100 * r["success_rate"] for r in line["horizons"]])
            lo, hi = (np.array([100 * r["ci95"][i] for r in line["horizons"]]) for i in (0, 1))
            ax.errorbar(h, rate, yerr=[rate - lo, hi - rate], fmt="o-", ms=3, capsize=3, label=name)
        ax.set_xticks([int(r["H"]) for r in line["horizons"]])
        ax.set(xlabel="planning horizon H (chunks)", ylabel="success (%), 95% Wilson", ylim=(-2, 102),
               title=f"vla_cem closed loop: {', '.join(c['families'])}, {c['episodes']} episodes each")
        figs["closed_loop_success"] = fig
    paths = []
    for stem, fig in figs.items():
        fig.axes[0].legend(fontsize=8)
        fig.axes[0].grid(alpha=0.3)
        fig.tight_layout()
        for ext in ("png", "pdf"):
            paths.append(atomic_write(out / f"{stem}.{ext}", lambda tmp: fig.savefig(tmp, format=ext, dpi=150)))
        plt.close(fig)
    return paths


@hydra.main(config_path=CONFIG_DIR, config_name="horizon", version_base="1.3")
@clean_errors
def main(cfg: DictConfig) -> None:
    from models.goal import GoalModel
    from models.vla import VLA
    from models.world_model import WorldModel

    torch.set_num_threads(int(cfg.threads))
    out = Path(cfg.out)
    wm_dirs = {name: checkpoint(d, "world_model", name) for name, d in cfg.variants.items()}
    world_models = {name: WorldModel.load(d) for name, d in wm_dirs.items()}  # shared by both parts
    lines = {}
    if cfg.closed_loop:  # check every checkpoint before any work
        (_, vla0_dir), *extra = [(n, checkpoint(d, "vla", n)) for n, d in cfg.vla_variants.items()]
        if clash := {n for n, _ in extra} & set(wm_dirs):
            raise ValueError(f"vla_variants {sorted(clash)} share a name with variants; rename them")
        (wm0, _), goal_dirs = next(iter(wm_dirs.items())), {}
        for name, d in wm_dirs.items():
            goal_dirs[name] = checkpoint(d.parent / "goal", "goal", name, world_model=d)
        combos = {**{n: (n, vla0_dir) for n in wm_dirs}, **{n: (wm0, d) for n, d in extra}}
        for name, (wm_name, vla_dir) in combos.items():
            paths = {"world_model": str(wm_dirs[wm_name]), "goal": str(goal_dirs[wm_name]), "vla": str(vla_dir)}
            lines[name] = (paths, (world_models[wm_name], GoalModel.load(paths["goal"]), VLA.load(paths["vla"])))
    results = {"config": OmegaConf.to_container(cfg, resolve=True),
               "open_loop": open_loop(cfg, world_models)}
    if lines:
        results["closed_loop"] = closed_loop(cfg, lines)
    variants = results["open_loop"]["variants"]
    rows = [[w["horizon"], w["episodes"], *(f"{v['rollout'][i]['ratio']:.2f} / "
                                            f"{100 * v['probe']['imagined'][i]['mean_error_of_table_width']:.1f}%"
                                            for v in variants.values())]
            for i, w in enumerate(results["open_loop"]["windows"])]
    print("open loop on held-out windows: latent error / copy-last, probe error on imagined latents (% of table):")
    print(format_table(["horizon", "episodes", *variants], rows))
    if lines:
        rows = [[name, r["H"], *success_cells(r), f"{r['plan_ms_median']:.1f}"]
                for name, line in results["closed_loop"]["lines"].items() for r in line["horizons"]]
        print(format_table(["line", "H", "successes", "rate", "95% CI", "plan ms (median)"], rows))
    for path in [write_json(out / "horizon.json", results), *figures(results, out)]:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
