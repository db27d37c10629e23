"""Velocity fields in our convention (t = 0 data, t = 1 noise, v = eps - x0; docs/design.md §1): teachers
and students alike. Add a teacher here.

- `GaussianMixture` (`gmm.py`): analytic data distribution with its exact marginal velocity (a test oracle).
- `NetworkTeacher` (`network.py`): any trained velocity network, frozen and called without autograd.
- `FlowVelocity` (`network.py`): networks that predict our velocity (SD3-style transformers, digits UNets).
- `VPVelocity` (`vp.py`): eps / v-prediction diffusers UNets (SD1.x/2.x/SDXL) through a change of variables.
- `AdaptersOff` (`lora.py`): a LoRA student's network with its adapters disabled, as its teacher.
- `from_pipeline`: the right adapter for a diffusers pipeline, chosen by its scheduler.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from proreflow.errors import ProReflowError

from proreflow.fields.gmm import GaussianMixture
from proreflow.fields.lora import AdaptersOff
from proreflow.fields.network import FlowVelocity, NetworkTeacher
from proreflow.fields.vp import VPSchedule, VPVelocity, timestep_placement, trailing_grid


def is_flow_matching(scheduler: Any) -> bool:
    """FlowMatchEulerDiscreteScheduler and its kin (SD3, FLUX): sigmas in [0, 1] and a time `shift`."""
    return hasattr(scheduler, "sigmas") and "shift" in scheduler.config


def denoiser(pipe: Any) -> nn.Module:
    """A pipeline's denoising network: an SD3-style pipeline's transformer, else its UNet."""
    return pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet


def from_pipeline(pipe: Any, guidance_scale: float = 1.0, network: nn.Module | None = None) -> nn.Module:
    """A velocity-field view of a diffusers pipeline's denoiser (`network`, default the pipeline's UNet or
    transformer): `FlowVelocity` for flow-matching schedulers, else `VPVelocity` with the scheduler's
    noise schedule and prediction type (epsilon or v_prediction)."""
    net = network if network is not None else denoiser(pipe)
    if is_flow_matching(pipe.scheduler):
        return FlowVelocity.from_scheduler(net, pipe.scheduler, guidance_scale)
    return VPVelocity(net, VPSchedule.from_scheduler(pipe.scheduler),
                      pipe.scheduler.config.get("prediction_type", "epsilon"), guidance_scale)


#: `window_placement` values: windows uniform in our flow time, or in the teacher's timesteps (PeRFlow's)
PLACEMENTS = ("flow", "timesteps")


def window_placement(pipe: Any, placement: str) -> Callable[[float], float] | None:
    """The boundary map of `placement` for a pipeline's teacher (None: uniform in flow time). A flow-matching
    teacher's timesteps are its flow time (t * T), so both placements agree there."""
    if placement not in PLACEMENTS:
        raise ProReflowError(f"window_placement must be one of {list(PLACEMENTS)}, got {placement!r}")
    if placement == "flow" or is_flow_matching(pipe.scheduler):
        return None
    return timestep_placement(VPSchedule.from_scheduler(pipe.scheduler))


def teacher_grid(pipe: Any, placement: str, steps: int) -> tuple[float, ...]:
    """Where a placed teacher solver (`TeacherSolver(mode="placed")`) steps for a pipeline's teacher: DDIM's
    trailing timesteps for a VP teacher with windows at its timesteps (the paper's DDIM-32), else uniform in
    flow time (a flow-matching teacher's sigmas)."""
    if placement not in PLACEMENTS:
        raise ProReflowError(f"window_placement must be one of {list(PLACEMENTS)}, got {placement!r}")
    if placement == "flow" or is_flow_matching(pipe.scheduler):
        return tuple(1.0 - j / steps for j in range(steps + 1))
    return trailing_grid(VPSchedule.from_scheduler(pipe.scheduler), steps)


__all__ = ["AdaptersOff", "FlowVelocity", "GaussianMixture", "NetworkTeacher", "VPSchedule", "VPVelocity",
           "PLACEMENTS", "denoiser", "from_pipeline", "is_flow_matching", "teacher_grid", "timestep_placement",
           "trailing_grid", "window_placement"]
