"""The single owner of the time/velocity convention (docs/design.md §1).

t = 0 is data, t = 1 is noise; the straight path is x_t = (1 - t) x0 + t eps and its
velocity is v = dx/dt = eps - x0. Sampling integrates from t = 1 down to t = 0.
Every other module goes through these helpers instead of re-deriving the algebra.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from proreflow.errors import ProReflowError


def expand_time(t: Tensor | float, like: Tensor) -> Tensor:
    """Broadcast a scalar or per-sample time of shape (B,) against a batch `like` of shape (B, ...)."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        return t
    return t.reshape(t.shape[0], *([1] * (like.ndim - 1)))


def interpolate(x0: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
    """Point x_t = (1 - t) x0 + t eps on the straight path between data and noise."""
    tt = expand_time(t, x0)
    return (1 - tt) * x0 + tt * eps


def path_velocity(x0: Tensor, eps: Tensor) -> Tensor:
    """Velocity dx/dt = eps - x0 of the straight path (t grows towards noise)."""
    return eps - x0


def split_velocity(x_t: Tensor, v: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor]:
    """Recover (x0, eps) from a point and its velocity: x0 = x_t - t v, eps = x_t + (1 - t) v."""
    tt = expand_time(t, x_t)
    return x_t - tt * v, x_t + (1 - tt) * v


def chord_velocity(x_a: Tensor, x_b: Tensor, t_a: Tensor | float, t_b: Tensor | float) -> Tensor:
    """Constant velocity that carries x_a at t_a to x_b at t_b in one Euler step."""
    return (x_a - x_b) / (expand_time(t_a, x_a) - expand_time(t_b, x_a))


def vp_to_flow(alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """Change of variables from a Gaussian diffusion x_tau = alpha x0 + sigma eps to our flow.

    Returns (scale, t) with y = scale * x_tau and t = sigma / (alpha + sigma), scale = 1 / (alpha + sigma).
    """
    denom = alpha + sigma
    return 1.0 / denom, sigma / denom


@dataclass(frozen=True)
class NoiseEntry:
    """Where a field's pure noise enters the time axis: noise eps is the state `scale * eps` at time `t`.

    For a straight flow that is eps at t = 1. A VP teacher never reaches t = 1: SD1.5's noisiest timestep
    has alpha_bar = 0.0047, flow time t_max = 0.936, and SD was trained, and every diffusers sampler starts,
    with x_999 = eps, i.e. y = eps / (alpha + sigma) at t_max (docs/design.md §1). Samplers and pair makers
    start there, so one Euler step of a VP field is one DDIM step from the very first step on.
    """

    t: float = 1.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not (0.0 < self.t <= 1.0) or not self.scale > 0:
            raise ProReflowError(f"a noise entry needs 0 < t <= 1 and scale > 0, got t={self.t}, scale={self.scale}")

    @property
    def is_default(self) -> bool:
        return self.t == 1.0 and self.scale == 1.0


#: a straight flow's pure noise: eps at t = 1
PURE_NOISE = NoiseEntry()


def noise_entry(field: Any) -> NoiseEntry:
    """A velocity field's `noise_entry` (VP adapters declare theirs), else pure noise at t = 1."""
    entry = getattr(field, "noise_entry", None)
    return entry if isinstance(entry, NoiseEntry) else PURE_NOISE
