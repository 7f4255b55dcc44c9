"""The planner: costs over imagined latents, one sampling loop for CEM and MPPI, the nevergrad
bridge, VLA-seeded proposals and the receding-horizon controller (see ../shared/DESIGN.md).
It imports models' interfaces only by duck typing and never touches the simulator."""

from .controller import MODES, ForesightController, PlanInfo, PlannerConfig
from .objective import CostConfig, Goal, Objective, latent_distance
from .optimizers import NevergradOptimizer, PlanResult, Proposal, SamplerConfig, SamplingOptimizer

__all__ = ["MODES", "ForesightController", "PlanInfo", "PlannerConfig", "CostConfig", "Goal", "Objective",
           "latent_distance", "NevergradOptimizer", "PlanResult", "Proposal", "SamplerConfig",
           "SamplingOptimizer"]
