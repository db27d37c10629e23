"""Windowed few-step sampler: Euler steps from t = 1 to 0, one (or more) per window.

It works for any velocity field, so the teacher, every baseline and every student are
sampled by this same code and compared fairly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from proreflow.conventions import noise_entry
from proreflow.errors import ProReflowError
from proreflow.solvers import SolverName, VelocityField, solve
from proreflow.windows import WindowSchedule


@torch.no_grad()
def sample(field: VelocityField, noise: Tensor, schedule: WindowSchedule, steps_per_window: int = 1,
           cond: Any = None, method: SolverName = "euler", return_trajectory: bool = False) -> Tensor | list[Tensor]:
    """Integrate from pure noise to data at t = 0 across the schedule's windows.

    Pure noise enters where the field says (`conventions.noise_entry`): eps at t = 1 for a straight flow,
    eps / (alpha + sigma) at the noisiest timestep's flow time for a VP teacher, which is what SD and every
    diffusers sampler feed (x_999 = eps), so Euler steps of a VP field are DDIM steps.

    With one Euler step per window, a student trained on `schedule` jumps window to window;
    it costs schedule.num_windows * steps_per_window field evaluations (times the solver's
    evaluations per step). return_trajectory=True returns every intermediate state.
    """
    if noise.ndim < 2:
        raise ProReflowError(f"noise must be batched (B, ...), got shape {tuple(noise.shape)}")
    entry = noise_entry(field)
    x = noise * entry.scale if entry.scale != 1.0 else noise
    traj = [x]
    b = schedule.entered_at(entry.t)
    for t_a, t_b in zip(b[:-1], b[1:]):
        out = solve(field, x, t_a, t_b, steps_per_window, method, cond, return_trajectory=True)
        traj.extend(out[1:])
        x = out[-1]
    return traj if return_trajectory else x
