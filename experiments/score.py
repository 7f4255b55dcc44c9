"""`foresight-score`: score candidate trajectories offline by their imagined end state.

    foresight-score data=data/tabletop_noisy.h5          # the shipped scoring world model and done model
    foresight-score data=data/tabletop_noisy.h5 lengths=matched   # the actions' length takes no part
    foresight-score data=exports/so101 horizon=4         # a LeRobot v3.0 directory (imported first)
    foresight-score candidates=chunks.npz out=scores.parquet

The world model (`world_model`, under `checkpoints`: by default the scoring world model, the
planner's encoder with a predictor trained for long rollouts, foresight-train target=predictor)
imagines the chunks, and the planner's own objective (planner/objective.py) gives the cost of the
imagined end state: by default (goal=done) the done model's -log P(every clause of the instruction
holds), with the done model `done` under `checkpoints` (scoring_done: the one the scoring world
model's predictor was trained against); goal=model, the distance to G(ℓ, z_0).
Dataset mode: per episode, the first observation, the recorded actions cut into H chunks of K and
the instruction. H is the same for every episode of a task family (its step budget in whole chunks,
else the longest episode's; or `horizon`), so a rollout's length says nothing about the episode's.
Episodes with fewer actions (successes end early) are padded with zeros (pad=zero: the pusher rests
once the episode is over, so the imagined end state is where the recorded actions led), their last
action (pad=repeat: the imagined pusher keeps moving), or skipped and counted (pad=skip). The length
itself tells success apart: the Σ‖a‖ baseline alone reaches AUROC 0.87 on noisy-expert tabletop
episodes with pad=zero. lengths=matched takes that away: each failure is cut at the length of a
random success of its family (and rests from there; its real end frame is the one at the cut).
Candidates mode: an .npz with pixels [N, (h,) V, H, W, 3] uint8, state [N, (h,) P], instructions [N],
candidates [N, M, H, K, A] and optional labels [N, M]; a cost and a rank (1 = best) per candidate.
Where labels exist: AUROC and Spearman of -cost against success, beside two baselines (the goal
replaced by z_0; the distance the actions travel) and, in dataset mode, the ceiling: the same goal's
cost of the real frame the actions led to. Scores go to `out` (.csv or .parquet), results.json beside them.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from scipy.stats import rankdata, spearmanr
from tqdm import tqdm

from experiments.common import CONFIG_DIR, atomic_write, clean_errors, format_table, write_json
from planner import CostConfig, Goal, Objective

# "cost" is the planner's objective under the goal the config names (GOAL_NAMES); the others are baselines.
GOAL_NAMES = {"model": "world model, goal G(ℓ, z_0)", "critic": "world model, language critic",
              "value": "world model, value head's steps-to-go",
              "done": "world model, done model's log P(every clause holds)"}
SCORERS = {"cost": GOAL_NAMES["model"], "cost_goal_z0": "world model, goal z_0 (copy)",
           "path_length": "actions alone: Σ‖a‖"}
# Dataset mode only: the same goal's cost of the real frame where the scored actions end, i.e. what
# the score would be if imagination were perfect; the gap to "cost" is what imagination loses.
REAL_END = {"cost_real_end": "the goal's cost of the real end frame (no imagination)"}


def ranking_metrics(score: np.ndarray, label: np.ndarray, rng: np.random.Generator, resamples: int = 1000) -> dict:
    """AUROC (Mann–Whitney: the chance a success outscores a failure, ties half) with a bootstrap 95%
    interval, and Spearman's ρ of score against label. NaN when only one class is present."""
    score, label = np.asarray(score, np.float64), np.asarray(label, bool)
    pos, neg = int(label.sum()), int((~label).sum())
    out = {"n": pos + neg, "successes": pos, "failures": neg, "auroc": float("nan"),
           "auroc_ci95": [float("nan")] * 2, "spearman": float("nan")}
    if pos == 0 or neg == 0:
        return out

    def auroc(s, y):  # rows of s [R, n], y [R, n]
        p, n = y.sum(-1), (~y).sum(-1)
        return ((rankdata(s, axis=-1) * y).sum(-1) - p * (p + 1) / 2) / np.maximum(p * n, 1)

    out["auroc"] = float(auroc(score[None], label[None])[0])
    if np.ptp(score) > 0:  # a constant score has no rank correlation
        out["spearman"] = float(spearmanr(score, label).statistic)
    if resamples:
        pick = rng.integers(len(score), size=(resamples, len(score)))
        y = label[pick]
        both = y.any(1) & ~y.all(1)  # resamples holding one class say nothing
        out["auroc_ci95"] = np.quantile(auroc(score[pick][both], y[both]), [0.025, 0.975]).tolist()
    return out


@torch.no_grad()
def score_observations(world_model, goal_model, pixels, state, lang: torch.Tensor, candidates,
                       cost: CostConfig, goal: str = "model", real_end=None, clauses=None) -> dict[str, list[np.ndarray]]:
    """Per observation n (pixels uint8 [h, V, H, W, 3], state [h, P], lang [N, L], candidates [M, H, K, A]):
    the objective's costs [M], with the goal model's goal and with z_0 as the goal, and Σ‖a‖ [M].
    goal=done: goal_model is the done model and clauses[n] [C, L] the embedded clauses of instruction n.
    real_end (pixels [N, 1, V, H, W, 3], state [N, 1, P]): also the goal's cost of that real frame [1]."""
    out = {name: [] for name in (SCORERS | REAL_END if real_end is not None else SCORERS)}
    for n in tqdm(range(len(candidates)), desc="scoring", unit="obs", leave=False):
        z = world_model.encode(torch.as_tensor(pixels[n])[None], torch.as_tensor(state[n])[None])  # [1, h, D]
        chunks, ln = torch.as_tensor(candidates[n], dtype=torch.float32), lang[n:n + 1]
        target = (Goal.from_done(goal_model, clauses[n]) if goal == "done"
                  else Goal.from_model(goal_model, ln, z[:, -1], goal))
        out["cost"].append(Objective(world_model, z, ln, target, cost)(chunks).numpy())
        out["cost_goal_z0"].append(Objective(world_model, z, ln, Goal(latent=z[0, -1]), cost)(chunks).numpy())
        out["path_length"].append(chunks.flatten(1, 2).norm(dim=-1).sum(-1).numpy())
        if real_end is not None:
            z_end = world_model.encode(torch.as_tensor(real_end[0][n])[None], torch.as_tensor(real_end[1][n])[None])
            out["cost_real_end"].append(target.cost(z_end[0, -1:], cost.distance).numpy())
    return out


def _check(what: str, shape, want, fix: str) -> None:
    if tuple(shape) != tuple(want):
        raise ValueError(f"{what} has shape {list(shape)}, the world model wants {list(want)}; {fix}")


def dataset_inputs(cfg: DictConfig, wm, out_dir: Path):
    """Episodes of the chosen policies and families as observations with one candidate each."""
    from envs.dataset import EpisodeDataset
    from envs.lerobot import import_lerobot

    path = Path(cfg.data)
    if path.is_dir():  # a LeRobot v3.0 directory: import it beside the scores, resized for the model
        imported = out_dir / "imported.h5"
        imported.unlink(missing_ok=True)
        import_lerobot(path, imported, image_size=wm.cfg.image_size)
        path = imported
    ds, c = EpisodeDataset(path), wm.cfg
    _check(f"{path}'s frames", ds.frames["pixels"].shape[1:], (c.cameras, c.image_size, c.image_size, 3),
           "collect or import it at the model's cameras and image size (foresight-lerobot import --image-size)")
    _check(f"{path}'s actions", ds.frames["action"].shape[1:], (c.action_dim,), "score with a matching world model")
    policies = [str(p).split("(")[0] for p in ds.policies]
    families = [ds.task(i).get("family", "") for i in range(len(ds))]
    keep = [i for i in range(len(ds)) if (not cfg.policies or policies[i] in cfg.policies)
            and (not cfg.families or families[i] in cfg.families)]
    if not keep:
        raise ValueError(f"{path} has no episodes of policies {cfg.policies} and families {cfg.families}; "
                         f"it holds policies {sorted(set(policies))} and families {sorted(set(families))}")
    if cfg.pad not in ("repeat", "zero", "skip"):
        raise ValueError(f"pad must be repeat, zero or skip, got {cfg.pad!r}")
    if cfg.lengths not in ("recorded", "matched"):
        raise ValueError(f"lengths must be recorded or matched, got {cfg.lengths!r}")
    # lengths=matched: each failure is cut at the length of a random success of its family, so that
    # how long the actions run (successes end early, then rest) says nothing about the outcome.
    rng = np.random.default_rng(cfg.seed)
    success_lengths = {f: ds.lengths[[j for j in keep if families[j] == f and ds.success[j]]] for f in set(families)}
    rows, pixels, state, chunks, ends, skipped = [], [], [], [], ([], []), 0
    for i in keep:
        lo, n = int(ds.starts[i]), int(ds.lengths[i])
        if cfg.lengths == "matched" and not ds.success[i] and len(success_lengths[families[i]]):
            n = min(n, int(rng.choice(success_lengths[families[i]])))
        steps = int(cfg.horizon) * c.chunk if cfg.horizon else int(ds.task(i).get("budget") or ds.lengths.max())
        h = -(-steps // c.chunk)  # whole chunks covering the budget
        actions = np.asarray(ds.frames["action"][lo:lo + min(n, h * c.chunk)], np.float32)
        short = h * c.chunk - len(actions)
        if short and cfg.pad == "skip":
            skipped += 1
            continue
        tail = actions[-1:] if cfg.pad == "repeat" else np.zeros_like(actions[-1:])
        chunks.append(np.concatenate([actions, np.repeat(tail, short, 0)]).reshape(1, h, c.chunk, -1))
        pixels.append(np.asarray(ds.frames["pixels"][lo:lo + 1]))
        state.append(np.asarray(ds.frames["state"][lo:lo + 1]))
        end = lo + min(n, h * c.chunk)  # the frame the scored actions lead to (the outcome, when padded)
        ends[0].append(np.asarray(ds.frames["pixels"][end:end + 1]))
        ends[1].append(np.asarray(ds.frames["state"][end:end + 1]))
        rows.append({"episode": i, "policy": ds.policies[i], "family": families[i], "instruction": ds.instructions[i],
                     "success": bool(ds.success[i]), "length": n, "recorded_length": int(ds.lengths[i]), "horizon": h,
                     "padded": short})
    ds.close()
    if not rows:
        raise ValueError(f"every selected episode is shorter than horizon={cfg.horizon} chunks of {c.chunk}; "
                         f"lower horizon or use pad=zero")
    return rows, pixels, state, chunks, ends, skipped


def candidate_inputs(path: str, wm):
    """The candidates file, checked against the world model (see the module doc for its layout)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"no candidates file at {path}")
    with np.load(path, allow_pickle=False) as f:  # never unpickle what a user hands in
        missing = {"pixels", "state", "instructions", "candidates"} - set(f.files)
        if missing:
            raise ValueError(f"{path} lacks {sorted(missing)}; it needs pixels, state, instructions, candidates")
        d = {k: f[k] for k in f.files}
    c, px, st, cand = wm.cfg, d["pixels"], d["state"], d["candidates"]
    if px.ndim == 5:  # one frame per observation: the history is that frame
        px, st = px[:, None], (st[:, None] if st.ndim == 2 else st)
    n = len(px)
    if px.dtype != np.uint8 or px.ndim != 6:
        raise ValueError(f"pixels must be uint8 [N, V, H, W, 3] or [N, h, V, H, W, 3], "
                         f"got {px.dtype} {list(px.shape)}")
    _check("pixels", px.shape[2:], (c.cameras, c.image_size, c.image_size, 3), "resize the frames to the model's")
    _check("state", st.shape, (n, px.shape[1], c.state_dim), "give one state [P] per frame")
    if cand.ndim != 5:
        raise ValueError(f"candidates must be [N, M, H, K, A], got {list(cand.shape)}; add the missing axes")
    _check("candidates", (cand.shape[0], *cand.shape[3:]), (n, c.chunk, c.action_dim),
           "give [N, M, H, K, A] with N observations, K the model's chunk and A its action dimension")
    texts = d["instructions"]
    if texts.dtype.kind != "U" or texts.shape != (n,):
        raise ValueError(f"instructions must be a str array of length {n} (np.array(list_of_str)), "
                         f"got {texts.dtype} {list(texts.shape)}")
    labels = d.get("labels")
    if labels is not None:
        _check("labels", labels.shape, cand.shape[:2], "give one label per candidate, [N, M]")
    return px, st.astype(np.float32), [str(t) for t in texts], cand.astype(np.float32), labels


def run(cfg: DictConfig) -> tuple[dict, Path]:
    from models import WorldModel, get_instruction_encoder
    from models.done import DoneModel
    from models.goal import GoalModel
    from planner.subgoals import split_instruction

    torch.set_num_threads(int(cfg.threads))
    root, out = Path(cfg.checkpoints), Path(cfg.out)
    if out.suffix not in (".csv", ".parquet"):
        raise ValueError(f"out must end in .csv or .parquet, got {out}")
    if cfg.goal not in GOAL_NAMES:
        raise ValueError(f"unknown goal {cfg.goal!r}; choose one of {', '.join(GOAL_NAMES)}")
    goal_dir = cfg.done if cfg.goal == "done" else "goal"
    for name in (cfg.world_model, goal_dir):
        if not (root / name).is_dir():
            raise FileNotFoundError(f"no {name} checkpoint in {root}; run `make train` (scoring_world_model: "
                                    f"foresight-train target=predictor; scoring_done: target=scoring_done) "
                                    f"or set checkpoints= / world_model= / done=")
    wm = WorldModel.load(root / cfg.world_model)
    gm = (DoneModel if cfg.goal == "done" else GoalModel).load(root / goal_dir)
    cost_cfg = CostConfig(**cfg.cost)
    results: dict = {"config": OmegaConf.to_container(cfg, resolve=True)}
    if cfg.candidates:
        px, st, texts, cand, labels = candidate_inputs(cfg.candidates, wm)
        real_end = None
    else:
        rows, px, st, cand, real_end, skipped = dataset_inputs(cfg, wm, out.parent)
        texts, labels = [r["instruction"] for r in rows], np.array([[r["success"]] for r in rows])
        results.update(skipped=skipped, padded=sum(r["padded"] > 0 for r in rows))
    encoder = get_instruction_encoder()
    clauses = [encoder.encode(split_instruction(t)) for t in texts] if cfg.goal == "done" else None
    scores = score_observations(wm, gm, px, st, encoder.encode(texts), cand, cost_cfg, cfg.goal, real_end, clauses)
    if cfg.candidates:
        rows = [{"observation": n, "candidate": m, "instruction": texts[n], "cost": float(c[m]),
                 "rank": int(r[m]), **({"label": bool(labels[n, m])} if labels is not None else {}),
                 **{k: float(scores[k][n][m]) for k in scores if k != "cost"}}
                for n, c in enumerate(scores["cost"]) for r in [rankdata(c, method="min")] for m in range(len(c))]
    else:
        for row, *v in zip(rows, *scores.values()):
            row.update({k: float(x[0]) for k, x in zip(scores, v)})
    if labels is not None:
        rng, y = np.random.default_rng(cfg.seed), np.asarray(labels, bool).ravel()  # [N, M] rows, as the costs
        score = {k: -np.nan_to_num(np.concatenate(v), nan=np.inf) for k, v in scores.items()}  # NaN cost: worst
        results["metrics"] = {k: ranking_metrics(score[k], y, rng, int(cfg.bootstrap)) for k in scores}
        if not cfg.candidates:  # pooled numbers mix families of different cost scales and success rates
            fam = np.array([r["family"] for r in rows])
            results["by_family"] = {f: ranking_metrics(score["cost"][fam == f], y[fam == f], rng, 0)
                                    for f in sorted(set(fam))}
    import pandas as pd
    frame = pd.DataFrame(rows)
    atomic_write(out, lambda tmp: (frame.to_csv if out.suffix == ".csv" else frame.to_parquet)(tmp, index=False))
    results["scores"] = str(out)
    return results, write_json(out.parent / "results.json", results)


def report(results: dict) -> str:
    if "metrics" not in results:
        return "no success labels: costs written, no AUROC"
    m = results["metrics"]
    if np.isnan(m["cost"]["auroc"]):
        r = m["cost"]
        return f"labels of one class only ({r['successes']}/{r['n']} successes): costs written, no AUROC"
    names = {**SCORERS, **REAL_END, "cost": GOAL_NAMES.get(results["config"].get("goal"), SCORERS["cost"])}
    rows = [[names[k], f"{r['auroc']:.3f}", f"[{r['auroc_ci95'][0]:.3f}, {r['auroc_ci95'][1]:.3f}]",
             f"{r['spearman']:.3f}"] for k, r in m.items()]
    r = m["cost"]
    head = f"{r['n']} scored ({r['successes']} successes, {r['failures']} failures)"
    if "skipped" in results:
        head += f"; {results['padded']} padded (pad={results['config']['pad']}), {results['skipped']} skipped"
    lines = [head, format_table(["scorer (-cost)", "AUROC", "95% CI", "Spearman"], rows)]
    if "by_family" in results:
        lines.append("world model within each family: " + ", ".join(
            f"{f} {r['auroc']:.3f} ({r['successes']}/{r['n']} successes)" for f, r in results["by_family"].items()))
    return "\n\n".join(lines)  # blank lines between: a markdown table ends at one


@hydra.main(config_path=CONFIG_DIR, config_name="score", version_base="1.3")
@clean_errors
def main(cfg: DictConfig) -> None:
    results, path = run(cfg)
    print(report(results))
    print(f"scores: {results['scores']}\nresults: {path}")


if __name__ == "__main__":
    main()
