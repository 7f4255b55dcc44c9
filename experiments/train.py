"""`foresight-train`: train the world model, the goal model (and later the VLA) from a dataset.

    foresight-train target=world_model                      # data/tabletop.h5 -> checkpoints/tabletop/world_model
    foresight-train target=goal                             # needs the world model
    torchrun --nproc_per_node=2 -m experiments.train target=world_model   # data-parallel (gloo on CPU)

The loop is the same for every target (experiments/targets.py says what a target is): AdamW with
warmup and cosine decay, gradient clipping, a progress bar, one JSON line of metrics per
`log_every` steps and per evaluation in `<run dir>/metrics.jsonl`, optionally an exponential
moving average of the weights (`target.weight_ema`) that is evaluated and shipped, and an atomic training
checkpoint every `checkpoint_every` steps in `<run dir>/checkpoint`. A rerun of the same command
resumes from it and logs the same losses an uninterrupted run would: every step's randomness is
drawn from generators seeded by (seed, step, rank), so nothing but the weights, the optimizer and
the step has to be saved. At the end the weights alone go to `out` (model.safetensors + config.json).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from experiments.common import CONFIG_DIR, atomic_write, clean_errors


def step_generators(seed: int, step: int, rank: int) -> tuple[np.random.Generator, torch.Generator]:
    """The randomness of one step: numpy for this rank's batch, torch shared by all ranks (SIGReg's
    projection directions must be the same on every rank)."""
    return (np.random.default_rng([seed, step, rank]),
            torch.Generator().manual_seed(int(np.random.default_rng([seed, step]).integers(2**62))))


def lr_at(step: int, cfg: DictConfig) -> float:
    """Linear warmup, then cosine decay to a tenth."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class WeightEMA:
    """An exponential moving average of the models' weights, as diffusion and flow-matching policies
    keep: evaluated and shipped in place of the last step's. The decay ramps up as (1+t)/(10+t), so
    the average does not start from the random initialisation."""

    def __init__(self, modules: dict[str, torch.nn.Module], decay: float):
        self.decay = decay
        self.averaged = {f"ema_{name}": copy.deepcopy(m).requires_grad_(False) for name, m in modules.items()}
        self.live = [t for m in modules.values() for t in (*m.parameters(), *m.buffers())]
        self.average = [t for m in self.averaged.values() for t in (*m.parameters(), *m.buffers())]
        floats = [t.is_floating_point() for t in self.live]
        self.averaged_pairs = [(a, t) for a, t, f in zip(self.average, self.live, floats) if f]
        self.copied_pairs = [(a, t) for a, t, f in zip(self.average, self.live, floats) if not f]  # counters

    @torch.no_grad()
    def restart(self) -> None:
        """Average from the live weights as they are now (after loading a model to fine-tune)."""
        torch._foreach_copy_(self.average, self.live)

    @torch.no_grad()
    def update(self, step: int) -> None:
        weight = 1 - min(self.decay, (1 + step) / (10 + step))
        averaged, live = zip(*self.averaged_pairs)
        torch._foreach_lerp_(list(averaged), list(live), weight)
        for average, latest in self.copied_pairs:
            average.copy_(latest)

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self):
        """The averaged weights in the live modules for the duration (the training weights after)."""
        kept = [t.clone() for t in self.live]
        torch._foreach_copy_(self.live, self.average)
        try:
            yield
        finally:
            torch._foreach_copy_(self.live, kept)


class MetricsLog:
    """Appends JSON lines; on resume, first drops the lines logged after the checkpoint's step."""

    def __init__(self, path: Path, resume_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        lines = path.read_text().splitlines() if path.exists() and resume_step > 0 else []
        kept = [line for line in lines if json.loads(line)["step"] <= resume_step]
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept)))
        self._file = open(path, "a")
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter  # only when tensorboard is installed
            self._tb = SummaryWriter(str(path.parent / "tensorboard"))
        except ImportError:
            pass

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({"step": step, **values}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Run (or resume) one training job in `run_dir`; returns the final evaluation. Rank 0 writes."""
    from models.checkpoint import (CheckpointNotFoundError, load_checkpoint, load_into, save_checkpoint,
                                   save_training_state, load_training_state)
    from experiments.targets import make_target

    rank, world = _init_distributed()
    torch.set_num_threads(max(1, int(cfg.threads) // world))
    tcfg = cfg.target
    if tcfg.batch % world:
        raise ValueError(f"target.batch={tcfg.batch} must divide by the {world} processes")
    ckpt_dir = run_dir / "checkpoint"
    target = make_target(cfg)
    params = [p for p in target.objective.parameters() if p.requires_grad]
    # What a resume restores: the models, and any training-only heads of the objective.
    resumable = {**target.modules, **getattr(target, "training_heads", {})}
    ema = WeightEMA(target.modules, float(tcfg.weight_ema)) if tcfg.get("weight_ema") else None
    if ema is not None:
        resumable.update(ema.averaged)
    evaluated = ema.applied if ema is not None else contextlib.nullcontext
    # fused: one kernel for all parameters (on CPU the default loops over them, 10-14 ms a step here)
    optimizer = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay, fused=True)

    start = 0
    if cfg.resume:
        try:
            state, _ = load_checkpoint(ckpt_dir)
            load_into(resumable, state)
            saved = load_training_state(ckpt_dir)
            optimizer.load_state_dict(saved.optimizer_state)
            start = saved.step
        except CheckpointNotFoundError:
            pass
    if start and rank == 0:
        print(f"resuming {tcfg.name} from step {start} ({ckpt_dir})")
    if not start and tcfg.get("init"):  # fine-tune: start from a saved model's weights
        load_into(target.modules, load_checkpoint(tcfg.init)[0])
        if ema is not None:
            ema.restart()
    objective = target.objective
    if world > 1:
        objective = torch.nn.parallel.DistributedDataParallel(objective)
    log = MetricsLog(run_dir / "metrics.jsonl", start, rank == 0)

    def checkpoint(step: int) -> None:
        if rank == 0:
            save_checkpoint(ckpt_dir, resumable, target.config())
            save_training_state(ckpt_dir, optimizer.state_dict(), {}, step)

    local_batch = tcfg.batch // world
    bar = tqdm(range(start, tcfg.steps), initial=start, total=tcfg.steps, desc=f"train {tcfg.name}",
               disable=rank != 0, dynamic_ncols=True)
    tick, samples = time.perf_counter(), 0
    for step in bar:
        rng, gen = step_generators(cfg.seed, step, rank)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, tcfg)
        target.objective.train()
        out = objective(**target.batch(rng, local_batch), generator=gen)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
        optimizer.step()
        target.after_step()
        if ema is not None:
            ema.update(step)
        samples += tcfg.batch
        if not torch.isfinite(out["loss"]):
            raise FloatingPointError(f"the loss became {out['loss'].item()} at step {step}; lower target.lr "
                                     f"(now {tcfg.lr}) or raise target.warmup")
        done = step + 1
        if done % cfg.log_every == 0 or done == tcfg.steps:
            values = _mean_over_ranks({k: v.detach() for k, v in out.items()}, world)
            now = time.perf_counter()
            values.update(lr=lr_at(step, tcfg), grad_norm=float(grad_norm), samples_per_s=samples / (now - tick))
            tick, samples = now, 0
            log.write(done, values)
            bar.set_postfix(loss=f"{values['loss']:.4f}")
        if done % tcfg.eval_every == 0 or done == tcfg.steps:
            if rank == 0:
                target.objective.eval()
                with evaluated():
                    log.write(done, {f"eval/{k}": v for k, v in target.evaluate().items()})
        if done % tcfg.checkpoint_every == 0 or done == tcfg.steps:
            checkpoint(done)
    bar.close()
    final = {}
    if rank == 0:
        target.objective.eval()
        with evaluated():
            final = target.evaluate()
            save_checkpoint(tcfg.out, target.modules, target.config(), extra={"eval": final, "steps": tcfg.steps})
        print(f"{tcfg.name}: " + ", ".join(f"{k} {v:.4g}" for k, v in final.items()))
        print(f"weights: {Path(tcfg.out).resolve()}  metrics: {run_dir / 'metrics.jsonl'}")
    log.close()
    if world > 1:
        dist.destroy_process_group()
    return final


def _init_distributed() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _mean_over_ranks(values: dict[str, torch.Tensor], world: int) -> dict[str, float]:
    names = sorted(values)
    stacked = torch.stack([values[k].float().reshape(()) for k in names])
    if world > 1:
        dist.all_reduce(stacked)
        stacked /= world
    return dict(zip(names, stacked.tolist()))


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
@clean_errors
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    OmegaConf.resolve(cfg)
    train(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
