"""Window pairs (x_a, x_b) that the teacher's ODE connects, and the training points on their chords.

For a window [t_a, t_b] (t_a noisier): x_a = (1 - t_a) x0 + t_a eps from real data (pure
noise when t_a = 1), x_b = the teacher's ODE solved from t_a to t_b only. The student's target
is the chord velocity (x_a - x_b) / (t_a - t_b), constant inside the window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from torch import Tensor

from proreflow.conventions import chord_velocity, expand_time, interpolate
from proreflow.errors import ProReflowError
from proreflow.solvers import NFE_PER_STEP, VelocityField, check_solver, solve
from proreflow.windows import WindowSchedule


@dataclass(frozen=True)
class TeacherSolver:
    """How the teacher's ODE is solved over a window.

    mode="per_window": `steps` steps in every window, whatever its length (equal teacher cost per
    pair for every plan, which is how methods are compared at equal budget).
    mode="per_unit_time": ceil(steps * window length) steps, i.e. a fixed step size, so narrow
    windows cost fewer teacher evaluations (the cost advantage of local reflow).
    """

    method: Literal["euler", "heun", "rk4"] = "rk4"
    steps: int = 4
    mode: Literal["per_window", "per_unit_time"] = "per_window"

    def __post_init__(self) -> None:
        check_solver(self.method, self.steps)
        if self.mode not in ("per_window", "per_unit_time"):
            raise ProReflowError(f"teacher solver mode must be 'per_window' or 'per_unit_time', got {self.mode!r}")

    def steps_for(self, length: float) -> int:
        if self.mode == "per_window":
            return self.steps
        return max(1, math.ceil(self.steps * length - 1e-9))  # tolerance: 4 * 0.25 is 1 step, not 2


@dataclass
class WindowPairs:
    """A batch of teacher-connected pairs and the window each one lives in."""

    x_a: Tensor
    x_b: Tensor
    t_a: Tensor  # (B,)
    t_b: Tensor  # (B,)
    cond: Any = None
    teacher_nfe: int = 0  # teacher evaluations spent on this batch, summed over samples

    @property
    def nfe_per_pair(self) -> float:
        return self.teacher_nfe / max(1, self.x_a.shape[0])

    def target(self) -> Tensor:
        """Chord velocity (x_a - x_b) / (t_a - t_b): what one Euler step over the window must use."""
        return chord_velocity(self.x_a, self.x_b, self.t_a, self.t_b)

    def point(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Point on the chord at fraction u in [0, 1) from x_a, and its time t = t_a - u (t_a - t_b)."""
        t = self.t_a - u * (self.t_a - self.t_b)
        uu = expand_time(u, self.x_a)
        return self.x_a + uu * (self.x_b - self.x_a), t


@torch.no_grad()
def make_window_pairs(teacher: VelocityField, x0: Tensor, schedule: WindowSchedule, solver: TeacherSolver,
                      generator: torch.Generator | None = None, cond: Any = None,
                      windows: Tensor | None = None, noise: Tensor | None = None) -> WindowPairs:
    """Pairs for a batch of real data x0: one window per sample (length-weighted unless given)."""
    n = x0.shape[0]
    if windows is None:
        windows = schedule.sample_windows(n, generator).to(x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device="cpu").to(x0.device)
    if noise.shape != x0.shape:
        raise ProReflowError(f"noise shape {tuple(noise.shape)} != data shape {tuple(x0.shape)}")
    t_a = schedule.starts(x0.device, x0.dtype)[windows]
    t_b = schedule.ends(x0.device, x0.dtype)[windows]
    x_a = interpolate(x0, noise, t_a)
    per = NFE_PER_STEP[solver.method]
    if solver.mode == "per_window":
        x_b = solve(teacher, x_a, t_a, t_b, solver.steps, solver.method, cond)
        nfe = n * solver.steps * per
    else:  # step counts differ per window: one batched solve per window present
        x_b = torch.empty_like(x_a)
        nfe = 0
        lengths = schedule.lengths().tolist()
        for w in torch.unique(windows).tolist():
            m = windows == w
            steps = solver.steps_for(lengths[w])
            x_b[m] = solve(teacher, x_a[m], t_a[m], t_b[m], steps, solver.method, map_cond(cond, lambda c: c[m]))
            nfe += int(m.sum()) * steps * per
    return WindowPairs(x_a=x_a, x_b=x_b, t_a=t_a, t_b=t_b, cond=cond, teacher_nfe=nfe)


def map_cond(cond: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply `fn` to every tensor of a conditioning (None, a tensor, or a dict of them), e.g. to
    select rows or move devices, so conditioning travels with its pairs whatever its shape."""
    if isinstance(cond, Tensor):
        return fn(cond)
    if isinstance(cond, dict):
        return {k: map_cond(v, fn) for k, v in cond.items()}
    return cond
