"""Every sampler as a diffusers scheduler, one module each, and one registry of names.

- `proreflow.py`: `ProReflowScheduler`, our students' windowed Euler in flow time (what `distill` exports).
- `perflow.py`: `PiecewiseFlowScheduler`, the sampling rule of PeRFlow's released checkpoints.
- `rectified_flow.py`: `RectifiedFlowScheduler`, InstaFlow's and 2-rectified flow's Euler.
- `solvers.py`: diffusers' ODE solvers (DDIM, Euler, DPM-Solver(++), UniPC, LCM) by name.

`make_scheduler(name, config, steps)` builds any of them from a model's scheduler config, so a stock
diffusers pipeline samples every student and baseline. To add a scheduler: a module here and a name below.
Importing this package does not import diffusers; building a scheduler does.
"""

from __future__ import annotations

from typing import Any

from proreflow.errors import ProReflowError
from proreflow.limits import MAX_SAMPLING_STEPS
from proreflow.schedulers.solvers import SOLVERS, SPACED, check_overrides, make_solver

#: samplers of published students that diffusers lacks: name -> PeRFlow prediction type, or None for
#: InstaFlow / 2-rectified flow
PUBLISHED: dict[str, str | None] = {"perflow": "diff_eps", "perflow-ddim-eps": "ddim_eps",
                                    "perflow-velocity": "velocity", "rectified-flow": None}
#: the window count of PeRFlow's released checkpoints (all of them: SD1.5, SD2.1, SDXL)
PERFLOW_WINDOWS = 4
#: every name `make_scheduler` (and `proreflow evaluate --scheduler`) knows
NAMES: tuple[str, ...] = (*SOLVERS, "proreflow", *PUBLISHED)

__all__ = ["MAX_SAMPLING_STEPS", "NAMES", "PERFLOW_WINDOWS", "PUBLISHED", "SOLVERS", "SPACED", "check_overrides",
           "make_scheduler", "make_solver"]


def make_scheduler(name: str, config: Any, steps: int = 1, timestep_spacing: str | None = "trailing",
                   flow: bool = False, overrides: dict[str, Any] | None = None) -> Any:
    """Scheduler `name` with the betas of a model's scheduler `config`. "proreflow": our windowed Euler over
    `steps` windows at the teacher's timesteps (= DDIM with trailing spacing from x_999 = eps, step for step,
    on a VP teacher); PUBLISHED: PeRFlow's and InstaFlow's samplers; the
    rest: diffusers' solvers (`solvers.make_solver`: `timestep_spacing`, `flow`, `overrides`)."""
    if name in PUBLISHED:
        kind = PUBLISHED[name]
        if kind is None:
            from proreflow.schedulers.rectified_flow import RectifiedFlowScheduler

            return RectifiedFlowScheduler(num_train_timesteps=config.get("num_train_timesteps", 1000))
        from proreflow.schedulers.perflow import perflow_scheduler

        return perflow_scheduler(config, prediction_type=kind, num_windows=PERFLOW_WINDOWS)
    if name == "proreflow":
        from proreflow.schedulers.proreflow import scheduler_for, timestep_windows

        return scheduler_for(config, timestep_windows(config, steps))
    if name not in SOLVERS:
        raise ProReflowError(f"unknown scheduler {name!r}; use one of {list(NAMES)}")
    return make_solver(name, config, timestep_spacing, flow, overrides)
