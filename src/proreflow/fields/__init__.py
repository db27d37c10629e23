"""Velocity fields in our convention (t = 0 data, t = 1 noise, v = eps - x0; docs/design.md §1): teachers
and students alike. Add a teacher here.

- `GaussianMixture` (`gmm.py`): analytic data distribution with its exact marginal velocity (a test oracle).
- `NetworkTeacher` (`network.py`): any trained velocity network, frozen and called without autograd.
- `FlowVelocity` (`network.py`): networks that predict our velocity (SD3-style transformers, digits UNets).
- `VPVelocity` (`vp.py`): eps / v-prediction diffusers UNets (SD1.x/2.x/SDXL) through a change of variables.
- `AdaptersOff` (`lora.py`): a LoRA student's network with its adapters disabled, as its teacher.
- `families/`: one module per kind of diffusers pipeline (SD, SDXL, SD3), the single owner of what it is;
  `from_pipeline` and the other pipeline helpers here ask `family_of(pipe)`.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from proreflow.fields.families import PLACEMENTS, TeacherFamily, check_placement, family_of
from proreflow.fields.gmm import GaussianMixture
from proreflow.fields.lora import AdaptersOff
from proreflow.fields.network import FlowVelocity, NetworkTeacher
from proreflow.fields.vp import VPSchedule, VPVelocity, timestep_placement, trailing_grid


def denoiser(pipe: Any) -> nn.Module:
    """A pipeline's denoising network (its UNet or transformer, as its family says)."""
    return family_of(pipe).denoiser(pipe)


def from_pipeline(pipe: Any, guidance_scale: float = 1.0, network: nn.Module | None = None) -> nn.Module:
    """A velocity-field view of a diffusers pipeline's denoiser (`network`, default the pipeline's UNet or
    transformer), as its family makes it: `VPVelocity` for SD/SDXL (the scheduler's noise schedule and prediction
    type), `FlowVelocity` for flow-matching transformers."""
    return family_of(pipe).field(pipe, network, guidance_scale)


def window_placement(pipe: Any, placement: str, resolution: int | None = None) -> Callable[[float], float] | None:
    """The boundary map of `placement` for a pipeline's teacher (None: uniform in flow time): "timesteps" puts
    windows where the teacher's scheduler steps (a VP teacher's timesteps, a flow teacher's shifted sigmas)."""
    return family_of(pipe).placement(pipe, placement, resolution)


def teacher_grid(pipe: Any, placement: str, steps: int, resolution: int | None = None) -> tuple[float, ...]:
    """Where a placed teacher solver (`TeacherSolver(mode="placed")`) steps for a pipeline's teacher: DDIM's
    trailing timesteps for a VP teacher with windows at its timesteps (the paper's DDIM-32), a flow teacher's
    shifted sigmas, else uniform in flow time."""
    return family_of(pipe).teacher_grid(pipe, placement, steps, resolution)


__all__ = ["AdaptersOff", "FlowVelocity", "GaussianMixture", "NetworkTeacher", "VPSchedule", "VPVelocity",
           "PLACEMENTS", "TeacherFamily", "check_placement", "denoiser", "family_of", "from_pipeline", "teacher_grid",
           "timestep_placement", "trailing_grid", "window_placement"]
