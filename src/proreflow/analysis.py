"""The paper's velocity analyses, for any velocity field (docs/design.md §3).

- `velocity_discrepancy` (fig. 1a): along the same teacher trajectories, how far apart the velocities
  at different timesteps are (RMS L2) and how aligned (cosine). Large off-diagonal distances are why
  one straight chord over the whole trajectory (global reflow) is hard and local windows help.
- `perturbed_field` (fig. 1b): the field with its velocity perturbed in direction only or in magnitude
  only, at the same relative perturbation norm ||v' - v|| = eps ||v||, to show which one hurts more.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from proreflow.errors import ProReflowError
from proreflow.solvers import VelocityField

PerturbKind = Literal["direction", "magnitude"]


@torch.no_grad()
def velocity_discrepancy(field: VelocityField, noise: Tensor, steps: int, cond: Any = None
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """Euler trajectories from t = 1 to 0; returns (times (T,), rms_l2 (T, T), cosine (T, T)).

    rms_l2[i, j] = mean over samples of ||v_i - v_j|| / sqrt(dim); cosine[i, j] = mean over samples
    of cos(v_i, v_j), each velocity taken per sample over all its dimensions.
    """
    if steps < 2:
        raise ProReflowError(f"the discrepancy map needs >= 2 timesteps, got {steps}")
    times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:-1]
    x, vs = noise, []
    for i, t in enumerate(times):
        tt = torch.full((x.shape[0],), float(t), dtype=x.dtype)
        v = field(x, tt, cond)
        vs.append(v.reshape(v.shape[0], -1).double())
        t_next = float(times[i + 1]) if i + 1 < steps else 0.0
        x = x + (t_next - float(t)) * v
    V = torch.stack(vs)  # (T, B, D)
    dim = V.shape[-1]
    diff = V[:, None] - V[None, :]  # (T, T, B, D)
    l2 = diff.norm(dim=-1).mean(-1) / math.sqrt(dim)
    unit = V / V.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos = torch.einsum("ibd,jbd->ijb", unit, unit).mean(-1)
    return times.float(), l2.float(), cos.float()


def perturb(v: Tensor, kind: PerturbKind, eps: float, gen: torch.Generator) -> Tensor:
    """v' with ||v' - v|| = eps ||v|| per sample: a rotation keeping |v| (direction) or a rescaling
    by 1 +- eps with a random sign (magnitude)."""
    flat = v.reshape(v.shape[0], -1).double()
    norm = flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    if kind == "magnitude":
        if not 0.0 <= eps <= 1.0:
            raise ProReflowError(f"magnitude perturbation needs eps in [0, 1], got {eps}")
        sign = torch.randint(0, 2, (flat.shape[0], 1), generator=gen).double() * 2 - 1
        out = flat * (1 + sign * eps)
    elif kind == "direction":
        if not 0.0 <= eps <= 2.0:
            raise ProReflowError(f"direction perturbation needs eps in [0, 2], got {eps}")
        unit = flat / norm
        u = torch.randn(flat.shape, generator=gen, dtype=torch.float64)
        u = u - (u * unit).sum(1, keepdim=True) * unit
        u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)
        theta = 2 * math.asin(eps / 2)  # chord of the rotation = eps * |v|
        out = norm * (math.cos(theta) * unit + math.sin(theta) * u)
    else:
        raise ProReflowError(f"unknown perturbation {kind!r}; use direction or magnitude")
    return out.reshape(v.shape).to(v.dtype)


def perturbed_field(field: VelocityField, kind: PerturbKind, eps: float, seed: int = 0) -> VelocityField:
    """`field` whose every output is perturbed by `perturb` (seeded, so runs are reproducible)."""
    gen = torch.Generator().manual_seed(seed)

    def wrapped(x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return perturb(field(x, t, cond), kind, eps, gen)

    return wrapped
