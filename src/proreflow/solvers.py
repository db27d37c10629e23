"""ODE integration of a velocity field over per-sample time intervals.

A velocity field is any callable `field(x, t, cond) -> v` with t of shape (B,). Every
solver accepts per-sample start and end times, so pairs for many different windows are
made in one batched call with no Python loop over samples.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch
from torch import Tensor

from proreflow.conventions import expand_time
from proreflow.errors import ProReflowError

VelocityField = Callable[[Tensor, Tensor, Any], Tensor]
SolverName = Literal["euler", "heun", "rk4"]

#: teacher evaluations per solver step (the cost unit we report)
NFE_PER_STEP: dict[str, int] = {"euler": 1, "heun": 2, "rk4": 4}


def check_solver(method: str, steps: int) -> None:
    if method not in NFE_PER_STEP:
        raise ProReflowError(f"unknown ODE solver {method!r}; choose one of {sorted(NFE_PER_STEP)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ProReflowError(f"solver steps must be a positive integer, got {steps!r}")


def _as_time(t: Tensor | float, x: Tensor) -> Tensor:
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


def step(field: VelocityField, x: Tensor, t: Tensor, h: Tensor, method: str, cond: Any = None) -> Tensor:
    """One step of size h (per sample, negative towards data) from time t."""
    hh = expand_time(h, x)
    k1 = field(x, t, cond)
    if method == "euler":
        return x + hh * k1
    if method == "heun":
        k2 = field(x + hh * k1, t + h, cond)
        return x + hh * 0.5 * (k1 + k2)
    if method == "rk4":
        k2 = field(x + 0.5 * hh * k1, t + 0.5 * h, cond)
        k3 = field(x + 0.5 * hh * k2, t + 0.5 * h, cond)
        k4 = field(x + hh * k3, t + h, cond)
        return x + hh * (k1 + 2 * k2 + 2 * k3 + k4) / 6
    raise ProReflowError(f"unknown ODE solver {method!r}; choose one of {sorted(NFE_PER_STEP)}")


def solve(field: VelocityField, x: Tensor, t_start: Tensor | float, t_end: Tensor | float,
          steps: int, method: SolverName = "euler", cond: Any = None,
          return_trajectory: bool = False) -> Tensor | list[Tensor]:
    """Integrate dx/dt = field(x, t) from t_start to t_end in `steps` equal steps per sample.

    Costs steps * NFE_PER_STEP[method] field evaluations per sample. With
    return_trajectory=True, returns the list of steps + 1 states (start included).
    """
    check_solver(method, steps)
    t0, t1 = _as_time(t_start, x), _as_time(t_end, x)
    h = (t1 - t0) / steps
    traj = [x] if return_trajectory else None
    for i in range(steps):
        x = step(field, x, t0 + i * h, h, method, cond)
        if traj is not None:
            traj.append(x)
    return traj if traj is not None else x
