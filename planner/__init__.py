"""Costs, CEM/MPPI, the nevergrad bridge, VLA-seeded proposals and the receding-horizon
controller (see ../shared/DESIGN.md). Nothing is public yet: the planner issue fills this package."""
