"""Student (and learned-teacher) networks; all take (x, t, cond) and return a velocity."""

from proreflow.models.mlp import VelocityMLP

__all__ = ["VelocityMLP"]
