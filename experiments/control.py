"""`foresight-control`: the main job. Foresight control in simulation, one planner mode after another
on the same fresh seeds.

    foresight-control                                   # the default modes on the shipped checkpoints
    foresight-control modes=[vla,vla_cem,cem] episodes=50 families=[push_to_pad]
    foresight-control env.perturbations.lighting=0.5 env.instruction_split=heldout
    foresight-control planner.horizon=2 planner.budget_ms=50

Prints a success table (95% Wilson intervals, planning time per replan) and writes
`results.json` and, with video=true, `videos/<mode>_<family>.mp4`: the executed frames with the
chosen plan's imagined end-state cost over time. When `<checkpoints>/decoder` holds a pixel decoder
(`foresight-train target=decoder`), each frame of a world-model mode also shows the chosen plan's
imagined end state, decoded: for viewing only, the planner never sees it.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import envs
from experiments.common import (CONFIG_DIR, captioned, clean_errors, format_table, success_cells,
                                success_summary, write_json, write_video, wrap_text)
from experiments.env_config import env_from_config
from planner import ForesightController, PlannerConfig


def load_models(checkpoints: str | Path, modes) -> dict:
    """The models the modes need from `checkpoints/{world_model,goal,vla}`, and where the world model
    is needed, the done model (clause-by-clause planning) and the pixel decoder (videos) if present."""
    from models.goal import GoalModel
    from models.vla import VLA
    from models.world_model import WorldModel

    root = Path(checkpoints)
    need = {"vla": any(m.startswith("vla") for m in modes), "world_model": any(m != "vla" for m in modes)}
    need["goal"] = need["world_model"]
    loaders = {"world_model": WorldModel.load, "goal": GoalModel.load, "vla": VLA.load}
    models = {}
    for name, needed in need.items():
        if needed:
            if not (root / name).is_dir():
                raise FileNotFoundError(f"no {name} checkpoint in {root}; run `make train` or point "
                                        f"checkpoints= at a directory with {name}/")
            models[name] = loaders[name](root / name)
    if need["world_model"] and (root / "decoder").is_dir():
        models["decoder"] = load_decoder(root)
    if need["world_model"] and (root / "done").is_dir():
        from models.done import DoneModel
        models["done"] = DoneModel.load(root / "done")
    return models


def load_decoder(root: Path):
    """The pixel decoder in `root/decoder`, or None (with a warning) when it was trained on
    another world model than `root/world_model`: its pictures would be meaningless."""
    from models.decoder import PixelDecoder, world_model_digest

    decoder = PixelDecoder.load(root / "decoder")
    if decoder.cfg.world_model != world_model_digest(root / "world_model"):
        tqdm.write(f"warning: {root / 'decoder'} was trained on another world model, so videos show no decoded "
                   f"imagination; retrain it: foresight-train target=decoder world_model={root / 'world_model'}")
        return None
    return decoder


def run_episode(env, controller, seed: int, family: str | None, video: bool, goal_model=None, decoder=None):
    """One episode; returns its outcome and, with video, the captioned frames (with a decoder,
    beside the decoded imagined end state of the chosen plan)."""
    obs, info = env.reset(seed=seed, options={"task": family} if family else None)
    controller.reset(obs["instruction"], seed=seed)
    plan_ms, evaluations, costs, frames = [], [], [], []
    success = done = False
    steps, last = 0, None
    while not done:
        action = controller.act(obs)
        plan = controller.last_plan
        if plan is not last:  # a replan happened in this act()
            last = plan
            plan_ms.append(plan.time_ms)
            evaluations.append(plan.evaluations)
            costs.append(plan.cost)
        if video:
            frames.append(_frame(env, info, steps, success, plan, costs, goal_model, controller, decoder))
        obs, _, success, truncated, info = env.step(action)
        steps += 1
        done = success or truncated
    if video:
        frames.append(_frame(env, info, steps, success, plan, costs, goal_model, controller, decoder))
    return {"seed": seed, "success": bool(success), "steps": steps, "plan_ms": plan_ms,
            "evaluations": evaluations}, frames


def _frame(env, info, step, success, plan, costs, goal_model, controller, decoder=None):
    lines = wrap_text(info["instruction"], 44)[:2]
    lines.append(f"{plan.mode}  step {step}/{info['task']['budget']}" + ("  success" if success else ""))
    if plan.latents is not None:
        with torch.no_grad():
            critic = float(goal_model.score(plan.latents[-1:], controller.lang)) if goal_model else float("nan")
        lines.append(f"imagined end: cost {plan.cost:.2f}  critic {critic:.1f}")
    real = env.render()
    frame = captioned(real, lines, height=64)
    if decoder is not None:  # beside it, the chosen plan's imagined end state, decoded
        image = _decoded(decoder, plan.latents[-1], real.shape[:2])
        frame = np.concatenate([frame, captioned(image, ["imagined end of plan", "(decoded latent)"],
                                                 height=frame.shape[0] - len(image))], axis=1)
    return np.concatenate([frame, _sparkline(costs, frame.shape[1], 40)], axis=0)


def _decoded(decoder, z: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """The latent z [D] as an image of `size` (H, W), scaled with nearest neighbours."""
    from PIL import Image

    image = Image.fromarray(decoder.decode(z[None])[0].numpy())
    return np.asarray(image.resize((size[1], size[0]), Image.NEAREST))


def _sparkline(values, width: int, height: int) -> np.ndarray:
    """A strip plotting the chosen plans' costs so far (blank where nothing was imagined)."""
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (width, height))
    vals = [v for v in values if np.isfinite(v)]
    if len(vals) >= 2:
        lo, hi = min(vals), max(vals)
        span = hi - lo or 1.0
        xs = np.linspace(4, width - 4, len(vals))
        ys = [height - 4 - (v - lo) / span * (height - 8) for v in vals]
        ImageDraw.Draw(strip).line(list(zip(xs, ys)), fill=(255, 200, 0), width=2)
    return np.asarray(strip)


def summarise(episodes: list[dict]) -> dict:
    plan_ms = np.concatenate([e["plan_ms"] for e in episodes])
    steps = sum(e["steps"] for e in episodes)
    return {**success_summary([e["success"] for e in episodes], [e["steps"] for e in episodes]),
            "plan_ms_median": float(np.median(plan_ms)), "plan_ms_p95": float(np.percentile(plan_ms, 95)),
            "plan_ms_per_step": float(plan_ms.sum() / steps),
            "evaluations_per_replan": float(np.mean(np.concatenate([e["evaluations"] for e in episodes])))}


@hydra.main(config_path=CONFIG_DIR, config_name="control", version_base="1.3")
@clean_errors
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(int(cfg.threads))
    out = Path(cfg.out)
    modes = list(cfg.modes)
    first_seed = envs.EVAL_SEED_START if cfg.seed is None else int(cfg.seed)
    models = load_models(cfg.checkpoints, modes)
    env = env_from_config(cfg.env, render_mode="rgb_array" if cfg.video else None, render_size=int(cfg.video_size))
    families = list(cfg.families or cfg.env.tasks)
    planner_cfg = OmegaConf.to_container(cfg.planner, resolve=True)
    results, records = {}, {}
    with tqdm(total=len(modes) * len(families) * cfg.episodes, desc="episodes", unit="ep") as bar:
        for mode in modes:
            controller = ForesightController(PlannerConfig(**{**planner_cfg, "mode": mode}),
                                             models.get("world_model"), models.get("goal"), models.get("vla"),
                                             done_model=models.get("done"))
            results[mode], records[mode], everything = {}, {}, []
            for family in families:
                episodes = []
                for ep in range(cfg.episodes):
                    video = bool(cfg.video) and ep < cfg.video_episodes
                    outcome, frames = run_episode(env, controller, first_seed + ep, family, video, models.get("goal"),
                                                  models.get("decoder") if mode != "vla" else None)
                    episodes.append(outcome)
                    if video:
                        name = f"{mode}_{family}" if cfg.video_episodes == 1 else f"{mode}_{family}_{ep}"
                        tqdm.write(f"video: {write_video(out / 'videos' / f'{name}.mp4', frames, fps=envs.tabletop.CONTROL_HZ)}")
                    bar.set_postfix(mode=mode, family=family, success=f"{sum(e['success'] for e in episodes)}/{len(episodes)}")
                    bar.update()
                results[mode][family] = summarise(episodes)
                records[mode][family] = [{"seed": e["seed"], "success": e["success"], "steps": e["steps"]}
                                         for e in episodes]
                everything += episodes
            if len(families) > 1:
                results[mode]["all"] = summarise(everything)
    env.close()
    rows = [(mode, family, *success_cells(r), f"{r['plan_ms_median']:.1f}",
             f"{r['plan_ms_p95']:.1f}", f"{r['evaluations_per_replan']:.0f}")
            for mode, per in results.items() for family, r in per.items()]
    print(format_table(["mode", "task", "successes", "rate", "95% CI", "plan ms (median)", "plan ms (p95)",
                        "rollouts/plan"], rows))
    write_json(out / "results.json", {"env": OmegaConf.to_container(cfg.env, resolve=True),
                                      "planner": planner_cfg, "checkpoints": str(cfg.checkpoints),
                                      "first_seed": first_seed, "results": results, "episodes": records})
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
