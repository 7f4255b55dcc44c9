"""The receding-horizon controller: propose, imagine, score, refine, then act.

    controller = ForesightController(PlannerConfig(mode="vla_cem"), world_model, goal_model, vla)
    controller.reset("push the blue cylinder onto the green pad")
    action = controller.act(obs)            # obs: {"pixels": {camera: uint8[H, W, 3]}, "state": f32[P]}
    controller.last_plan                    # candidates, costs, imagined latents, time of the last replan

Every `n_exec` actions it replans: the world model encodes the latest observations (latents one
chunk apart, as in training), the goal model says where the instruction wants the world to end
up, and the mode's optimizer searches plans of `horizon` chunks against it. Modes:

    vla        the VLA's chunk, no world model
    vla_rank   the best of N VLA chunks by imagined cost
    cem, mppi  the world model alone, Gaussian samples around the warm-started mean
    vla_cem, vla_mppi  N VLA chunks plus Gaussian samples around their mean, refined (the mission)
    ng         a nevergrad optimizer by registry name (ng_optimizer), world model alone

A plan's first chunk comes from the VLA in the vla_* modes; its later chunks, and the whole plan
otherwise, come from the previous plan shifted by the executed actions (zeros at an episode's
start). An instruction of several steps ("..., then ...") is planned clause by clause
(`subgoals`, planner/subgoals.py): at each replan the done model (models/done.py) says which
clauses already hold in the present frame, and the VLA proposes, and the goal aims, for the first
that does not. The controller never touches the simulator.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from .objective import CostConfig, Goal, Objective
from .optimizers import NevergradOptimizer, PlanResult, Proposal, SamplerConfig, SamplingOptimizer
from .subgoals import split_instruction

log = logging.getLogger(__name__)

MODES = ("vla", "vla_rank", "cem", "mppi", "vla_cem", "vla_mppi", "ng")
GOALS = ("model", "critic", "image", "value")


@dataclass
class PlannerConfig:
    mode: str = "vla_cem"
    horizon: int = 4  # H, chunks imagined per candidate
    n_exec: int = 4  # actions executed before replanning
    vla_samples: int = 32  # N chunks from the VLA (vla_rank, vla_cem, vla_mppi)
    population: int = 128  # Gaussian samples per iteration
    iterations: int = 3
    elites: int = 16  # cem
    temperature: float = 0.5  # mppi, in units of the population's cost std
    momentum: float = 0.1
    init_std: float = 0.5  # of the Gaussian around the warm-started mean
    min_std: float = 0.05
    budget_ms: float | None = None  # anytime deadline per replan
    goal: str = "model"  # model: G(ℓ, z_now); critic: the language critic; image: reset(goal_obs=...);
    #                      value: the goal model's steps-to-go (from its value) of the imagined end state
    cost: CostConfig = field(default_factory=CostConfig)
    ng_optimizer: str = "CMA"
    ng_evaluations: int = 768
    subgoals: bool = True  # plan a multi-step instruction clause by clause (where a done model is given)
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.cost, dict):
            self.cost = CostConfig(**self.cost)
        if self.mode not in MODES:
            raise ValueError(f"unknown planner mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.goal not in GOALS:
            raise ValueError(f"unknown goal {self.goal!r}; choose one of {', '.join(GOALS)}")
        if self.horizon < 1 or self.n_exec < 1 or self.vla_samples < 1:
            raise ValueError("horizon, n_exec and vla_samples must be ≥ 1")

    @property
    def uses_vla(self) -> bool:
        return self.mode.startswith("vla")


@dataclass
class PlanInfo:
    """What the last replan did (for diagnostics, videos and benchmarks)."""

    mode: str
    actions: torch.Tensor  # [H, K, A] the chosen plan
    cost: float  # its cost (nan in mode vla: nothing was imagined)
    candidates: torch.Tensor | None  # [M, H, K, A] of the last iteration
    costs: torch.Tensor | None  # [M]
    latents: torch.Tensor | None  # [H, D] the chosen plan, imagined
    evaluations: int  # imagined rollouts
    iterations: int
    time_ms: float  # the whole replan: encoding, proposals, search
    fallback: str | None = None  # why the VLA's chunk was executed instead of the plan
    clause: str | None = None  # the clause planned for, when the instruction was split into several


@dataclass
class Clause:
    """One step of the instruction, as the goal model and the VLA read it."""

    text: str
    lang: torch.Tensor  # [1, L]
    vla_language: dict  # the VLA's instruction inputs


class ForesightController:
    """A policy object: reset(instruction), act(obs) -> action f32[A], last_plan."""

    def __init__(self, cfg: PlannerConfig, world_model=None, goal_model=None, vla=None, text_encoder=None,
                 done_model=None):
        if cfg.uses_vla and vla is None:
            raise ValueError(f"mode {cfg.mode} needs a VLA; pass vla=VLA.load(...)")
        if cfg.mode != "vla":
            if world_model is None:
                raise ValueError(f"mode {cfg.mode} needs a world model; pass world_model=WorldModel.load(...)")
            if cfg.goal != "image" and goal_model is None:
                raise ValueError(f"goal={cfg.goal} needs a goal model; pass goal_model=GoalModel.load(...) "
                                 "or use goal=image")
            if cfg.goal == "value" and goal_model.value_net is None:
                raise ValueError("goal=value needs a goal model trained with a value head "
                                 "(foresight-train target=goal +target.model.value=true)")
        if text_encoder is None:
            from models import get_instruction_encoder
            text_encoder = get_instruction_encoder()
        self.cfg, self.world_model, self.goal_model, self.vla = cfg, world_model, goal_model, vla
        self.done_model = done_model
        self.text = text_encoder
        spec = (world_model or vla).cfg
        self.chunk, self.action_dim = spec.chunk, spec.action_dim
        self.frame_shape = (spec.cameras, spec.image_size, spec.image_size, 3)
        if cfg.n_exec > cfg.horizon * self.chunk:
            raise ValueError(f"n_exec={cfg.n_exec} exceeds the plan's {cfg.horizon}×{self.chunk} actions")
        # The predictor's history: latents one chunk apart, ending now.
        self.history = world_model.cfg.history if world_model is not None else 1
        self.optimizer = self._optimizer()
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.last_plan: PlanInfo | None = None
        self._frames: deque = deque(maxlen=self.chunk * (self.history - 1) + 1)
        self._queue: deque = deque()
        self._plan: torch.Tensor | None = None
        self.lang = self._goal_latent = None
        self.clauses: list[Clause] = []

    def _optimizer(self):
        cfg = self.cfg
        if cfg.mode == "ng":
            return NevergradOptimizer(cfg.ng_optimizer, cfg.ng_evaluations, batch=cfg.population,
                                      budget_ms=cfg.budget_ms)
        refit = "mppi" if cfg.mode.endswith("mppi") else "cem"
        return SamplingOptimizer(SamplerConfig(
            refit=refit, population=cfg.population, iterations=cfg.iterations, elites=cfg.elites,
            temperature=cfg.temperature, momentum=cfg.momentum, min_std=cfg.min_std, budget_ms=cfg.budget_ms))

    # ------------------------------------------------------------------ policy interface

    def reset(self, instruction: str, goal_obs: dict | None = None, seed: int | None = None) -> None:
        """Start an episode. goal_obs (an observation of the goal) is required by goal=image;
        seed re-seeds the sampling so that paired runs draw the same noise."""
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError("reset needs the instruction as a non-empty string")
        self.lang = self.text.encode([instruction])
        texts = split_instruction(instruction) if self._sequencing() else []
        self.clauses = [self._clause(t) for t in (texts if len(texts) > 1 else [instruction])]
        self._frames.clear()
        self._queue.clear()
        self._plan, self.last_plan, self._goal_latent = None, None, None
        if seed is not None:
            self.generator.manual_seed(seed)
        if self.cfg.goal == "image" and self.cfg.mode != "vla":
            if goal_obs is None:
                raise ValueError("goal=image needs reset(instruction, goal_obs=<an observation of the goal>)")
            pixels, state = self._tensors(goal_obs)
            self._goal_latent = self.world_model.encode_target(pixels[None, None], state[None, None])[0, 0]

    @torch.no_grad()
    def act(self, obs: dict) -> np.ndarray:
        """The next action f32[A] in [-1, 1]."""
        if self.lang is None:
            raise RuntimeError("call reset(instruction) before act(obs)")
        self._frames.append(self._tensors(obs))
        if not self._queue:
            self._replan()
        return self._queue.popleft().numpy()

    # ------------------------------------------------------------------ planning

    def _sequencing(self) -> bool:
        """Whether a multi-step instruction is planned clause by clause here."""
        return self.cfg.subgoals and self.cfg.mode != "vla" and self.done_model is not None

    def _clause(self, text: str) -> Clause:
        return Clause(text, self.text.encode([text]),
                      self.vla.instruction_inputs(text, self.text) if self.vla is not None else {})

    def _due_clause(self, z_now: torch.Tensor) -> Clause:
        """The first clause the done model does not see met in the present frame (the last if all are)."""
        for clause in self.clauses[:-1]:
            if float(self.done_model.done(z_now, clause.lang)[0]) < 0.5:
                return clause
        return self.clauses[-1]

    def _replan(self) -> None:
        cfg = self.cfg
        start = time.perf_counter()
        pixels, state = self._frames[-1]
        z_hist = self._history() if cfg.mode != "vla" else None
        clause = self._due_clause(z_hist[:, -1]) if len(self.clauses) > 1 else self.clauses[0]
        batch = {"pixels": pixels[None], "state": state[None], "lang": clause.lang, **clause.vla_language}
        chunks = self.vla.sample_chunks(batch, cfg.vla_samples if cfg.mode != "vla" else 1,
                                        self.generator)[0] if cfg.uses_vla else None  # [N, K, A]
        if cfg.mode == "vla":
            self._execute(chunks[0][None])
            self.last_plan = PlanInfo("vla", chunks[0][None], float("nan"), None, None, None, 0, 0,
                                      (time.perf_counter() - start) * 1e3)
            return
        # The predictor reads the whole instruction, as in training; the goal is the due clause's.
        goal = self._goal(z_hist[:, -1], clause.lang)
        objective = Objective(self.world_model, z_hist, self.lang, goal, cfg.cost, chunks)
        mean = self._warm_start()
        samples = None
        if chunks is not None:
            mean[0] = chunks.mean(0)
            if self._plan is None:  # nothing to shift yet: repeat the VLA's chunk
                mean[1:] = mean[0]
            samples = torch.cat([chunks[:, None], mean[None, 1:].expand(len(chunks), -1, -1, -1)], dim=1)
        if cfg.mode == "vla_rank":
            costs = objective(samples)
            best = int(torch.argmin(torch.nan_to_num(costs, nan=float("inf"))))
            result = PlanResult(samples[best], float(costs[best]), samples, costs, 1, len(samples), 0.0)
        else:
            init = Proposal(mean, torch.full_like(mean, cfg.init_std), samples)
            result = self.optimizer.optimize(objective, init, self.generator)
        plan, fallback = result.actions, None
        if not np.isfinite(result.cost):
            fallback = "every candidate's cost was non-finite"
            plan = mean if chunks is None else torch.cat([chunks[:1], mean[1:]])
            log.warning("planner fell back to %s: %s", "the VLA's chunk" if chunks is not None else "the warm start",
                        fallback)
        latents = self.world_model.rollout(z_hist, plan[None], self.lang)[0]
        self._execute(plan)
        self.last_plan = PlanInfo(cfg.mode, plan, result.cost, result.candidates, result.costs, latents,
                                  result.evaluations, result.iterations, (time.perf_counter() - start) * 1e3,
                                  fallback, clause.text if len(self.clauses) > 1 else None)

    def _execute(self, plan: torch.Tensor) -> None:
        """Queue the first n_exec actions of plan [H, K, A] and keep it for the warm start."""
        self._plan = plan
        self._queue.extend(plan.flatten(0, 1)[: self.cfg.n_exec].float().unbind(0))

    def _warm_start(self) -> torch.Tensor:
        """The previous plan shifted by the executed actions (its last action repeated), [H, K, A]."""
        shape = (self.cfg.horizon, self.chunk, self.action_dim)
        if self._plan is None or self._plan.shape != shape:
            return torch.zeros(shape)
        flat = self._plan.flatten(0, 1)
        n = self.cfg.n_exec
        return torch.cat([flat[n:], flat[-1:].expand(n, -1)]).reshape(shape)

    def _history(self) -> torch.Tensor:
        """Latents of the frames one chunk apart ending now [1, h, D] (the first frame repeated early on)."""
        frames = list(self._frames)
        picks = [max(0, len(frames) - 1 - self.chunk * i) for i in reversed(range(self.history))]
        pixels = torch.stack([frames[i][0] for i in picks])[None]
        state = torch.stack([frames[i][1] for i in picks])[None]
        return self.world_model.encode(pixels, state)

    def _goal(self, z_now: torch.Tensor, lang: torch.Tensor) -> Goal:
        if self.cfg.goal == "image":
            return Goal(latent=self._goal_latent)
        return Goal.from_model(self.goal_model, lang, z_now, self.cfg.goal)

    def _tensors(self, obs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """An observation as (pixels uint8 [V, H, W, 3], state f32 [P]); cameras in the dict's order."""
        if not isinstance(obs, dict) or "pixels" not in obs or "state" not in obs:
            raise ValueError("obs must be the env's observation dict with 'pixels' ({camera: image}) and 'state'")
        views = obs["pixels"].values() if isinstance(obs["pixels"], dict) else [obs["pixels"]]
        pixels = torch.from_numpy(np.stack([np.asarray(v) for v in views]))
        if tuple(pixels.shape) != self.frame_shape or pixels.dtype != torch.uint8:
            raise ValueError(f"pixels must be uint8 {list(self.frame_shape)} (cameras, size, size, 3) as the "
                             f"models were trained on, got {pixels.dtype} {list(pixels.shape)}; "
                             "make the env with the same cameras and image_size")
        return pixels, torch.as_tensor(np.asarray(obs["state"]), dtype=torch.float32)
