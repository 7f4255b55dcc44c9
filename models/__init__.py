"""Torch modules and their training: instruction encoder, vision encoders, the JEPA world model,
the goal model and the VLA (see ../shared/DESIGN.md). Nothing is public yet: the world-model and
VLA issues fill this package."""
