"""The single owner of the time/velocity convention (docs/design.md §1).

t = 0 is data, t = 1 is noise; the straight path is x_t = (1 - t) x0 + t eps and its
velocity is v = dx/dt = eps - x0. Sampling integrates from t = 1 down to t = 0.
Every other module goes through these helpers instead of re-deriving the algebra.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
