"""Gaussian diffusion (VP) teachers in our flow convention (docs/design.md §1).

A model trained on x_tau = alpha_tau x0 + sigma_tau eps (SD1.5/SDXL: eps-prediction; SD2.x:
v-prediction) is our straight flow after y = x_tau / (alpha + sigma), t = sigma / (alpha + sigma).
`VPSchedule` owns the continuous map t <-> timestep built from the scheduler's `alphas_cumprod`
(log alpha_bar interpolated linearly between integer timesteps), and `output_to_velocity` is the one
place where a model output becomes a velocity eps_hat - x0_hat. One Euler step of that velocity
between two timesteps is exactly one DDIM (eta = 0) step.

The schedule never reaches t = 1: SD1.5's noisiest timestep 999 has alpha_bar = 0.0047, so its flow time
is t_max = 0.936. SD was trained, and every diffusers sampler starts, with x_999 = eps (std 1), which is
y = eps / (alpha + sigma) at t_max. `VPVelocity.noise_entry` says so, and samplers and pair makers start
there (`conventions.noise_entry`): one Euler step per window is then exactly one DDIM step, the first
included. (Evaluating pure noise at t = 1 instead would feed the UNet 1.066 * eps at timestep 999.)
Times above t_max are still evaluated at timestep 999 with x_tau = (alpha + sigma) y, but nothing of ours
asks for them.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from proreflow.conventions import (ModuleField, PredictionType, NoiseEntry, check_prediction_type, flow_scale, flow_time,
                                   output_gain, output_to_velocity, velocity_to_output, vp_of_flow)
from proreflow.errors import ProReflowError
from proreflow.fields.network import call_network, guided_call

__all__ = ["VPSchedule", "VPVelocity", "output_to_velocity", "velocity_to_output", "timestep_placement",
           "trailing_grid"]  # the conversions live in conventions; tests and callers find them here too


class VPSchedule:
    """Continuous timestep <-> flow time map of a discrete VP schedule."""

    def __init__(self, alphas_cumprod: Tensor) -> None:
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if ac.ndim != 1 or ac.numel() < 2 or not torch.all((ac > 0) & (ac < 1)):
            raise ProReflowError("alphas_cumprod must be a 1-D tensor of values in (0, 1)")
        if not torch.all(ac[1:] < ac[:-1]):
            raise ProReflowError("alphas_cumprod must decrease with the timestep")
        self.log_ac = torch.log(ac)
        self.t_table = flow_time(ac.sqrt(), (1 - ac).sqrt())  # increasing in the timestep

    @classmethod
    def from_scheduler(cls, scheduler: Any) -> "VPSchedule":
        """From any diffusers scheduler that has `alphas_cumprod` (DDPM, DDIM, Euler, DPM-Solver, ...)."""
        ac = getattr(scheduler, "alphas_cumprod", None)
        if ac is None:
            raise ProReflowError(f"{type(scheduler).__name__} has no alphas_cumprod; it is not a VP scheduler")
        return cls(ac)

    @property
    def num_train_timesteps(self) -> int:
        return self.log_ac.numel()

    @property
    def t_min(self) -> float:
        return float(self.t_table[0])

    @property
    def t_max(self) -> float:
        return float(self.t_table[-1])

    def alpha_sigma(self, timestep: Tensor) -> tuple[Tensor, Tensor]:
        """alpha, sigma at continuous timesteps (clamped to the trained range)."""
        tau = timestep.double().clamp(0, self.num_train_timesteps - 1)
        lo = tau.floor().long().clamp(max=self.num_train_timesteps - 2)
        frac = tau - lo
        lac = self.log_ac.to(tau.device)
        log_ac = lac[lo] * (1 - frac) + lac[lo + 1] * frac
        ac = log_ac.exp()
        return ac.sqrt(), (1 - ac).sqrt()

    def t_of_timestep(self, timestep: Tensor) -> Tensor:
        return flow_time(*self.alpha_sigma(timestep))

    def timestep_of_t(self, t: Tensor) -> Tensor:
        """Continuous timestep whose flow time is t (clamped to [t_min, t_max]), by bisection on the
        monotone interpolated map so that t_of_timestep(timestep_of_t(t)) == t inside the range."""
        tt = t.double().clamp(self.t_min, self.t_max)
        lo = torch.zeros_like(tt)
        hi = torch.full_like(tt, float(self.num_train_timesteps - 1))
        for _ in range(60):  # 999 / 2^60: exact to float64
            mid = 0.5 * (lo + hi)
            below = self.t_of_timestep(mid) < tt
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return 0.5 * (lo + hi)

    def scale(self, timestep: Tensor) -> Tensor:
        """alpha + sigma: x_tau = scale * y."""
        return flow_scale(*self.alpha_sigma(timestep))

    @property
    def noise_entry(self) -> NoiseEntry:
        """Pure noise as SD feeds it: x_999 = eps, i.e. y = eps / (alpha + sigma) at t_max."""
        top = torch.tensor([float(self.num_train_timesteps - 1)], dtype=torch.float64)
        return NoiseEntry(t=self.t_max, scale=float(1.0 / self.scale(top)))


class VPVelocity(ModuleField, nn.Module):
    """A VP-parametrised diffusers network (teacher or student) seen as a velocity field v(y, t, cond).

    `cond` is a flat dict of per-sample tensors: keyword arguments for the network
    (`encoder_hidden_states`, `class_labels`, ...) and SDXL's `text_embeds` / `time_ids`, which
    `network_kwargs` gathers into `added_cond_kwargs` (flat, so that row selection, device moves and
    pair caches treat every entry alike). With guidance_scale != 1 and an `uncond` entry holding
    the unconditional conditioning in the same form, classifier-free guidance is applied to the
    raw outputs (the paper trains students at scale 1 and guides only when sampling). The student
    keeps the teacher's output parametrisation, so its `unet` stays loadable by diffusers.
    """

    def __init__(self, unet: nn.Module, schedule: VPSchedule, prediction_type: PredictionType = "epsilon",
                 guidance_scale: float = 1.0) -> None:
        super().__init__()
        self.unet, self.schedule, self.prediction_type = unet, schedule, check_prediction_type(prediction_type)
        self.guidance_scale = guidance_scale

    @property
    def noise_entry(self) -> NoiseEntry:
        """Where samplers start this field from pure noise (`VPSchedule.noise_entry`)."""
        return self.schedule.noise_entry

    def _call(self, x_tau: Tensor, timestep: Tensor, cond: Any) -> Tensor:
        return call_network(self.unet, x_tau, timestep, cond)

    def loss_weight(self, t: Tensor) -> Tensor:
        """1 / A(t)^2 where v = A(t) * output + B(t) * x: weights a velocity MSE so that it equals the MSE
        of the network's own output (eps: (alpha / (alpha + sigma))^2, 0.0041 at SD's timestep 999 against
        0.35 at 249). Used only under `loss_weighting: output`: on the trained mini SD it left the first of 4
        windows untrained (its one-step error rose 51-53 % over DDIM's), where the unweighted velocity MSE, the default,
        lowered it (benchmarks/results/mini_sd_windows.md)."""
        alpha, sigma = self.schedule.alpha_sigma(self.schedule.timestep_of_t(t))
        return (1.0 / output_gain(alpha, sigma, self.prediction_type) ** 2).to(t.device, torch.float32)

    def forward(self, y: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        timestep = self.schedule.timestep_of_t(t)
        alpha, sigma = (v.to(y.device, y.dtype) for v in self.schedule.alpha_sigma(timestep))
        x_tau = vp_of_flow(y, alpha, sigma)
        ts = timestep.to(y.device, torch.float32)
        out = guided_call(lambda c: self._call(x_tau, ts, c), cond, self.guidance_scale)
        return output_to_velocity(out.to(y.dtype), x_tau, alpha, sigma, self.prediction_type)


def timestep_placement(schedule: VPSchedule) -> Callable[[float], float]:
    """PeRFlow's window placement: boundaries uniform in the teacher's discrete timesteps instead of in flow time.
    A boundary at u in (0, 1) sits at timestep u * T - 1, so K windows start at T - 1, T - 1 - T/K, ...
    (999/749/499/249 for SD1.5 and K = 4); the first window still starts at pure noise (t = 1)."""
    T = schedule.num_train_timesteps
    return lambda u: float(schedule.t_of_timestep(torch.tensor(u * T - 1.0, dtype=torch.float64)))


def trailing_grid(schedule: VPSchedule, steps: int) -> tuple[float, ...]:
    """The flow times where DDIM with trailing spacing steps in `steps` steps (round(T - j T/n) - 1: 999, 968,
    937, ... for SD1.5 and n = 32), from 1 (pure noise, which enters at t_max) down to 0: the teacher grid of
    `TeacherSolver(mode="placed")`, so a VP teacher's Euler pairs are the paper's DDIM-32 step for step."""
    T = schedule.num_train_timesteps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ProReflowError(f"a teacher grid needs 1 to {T} steps, got {steps!r}")
    ts = [round(T - j * T / steps) - 1 for j in range(1, steps)]  # the steps after the first (T - 1)
    inner = schedule.t_of_timestep(torch.tensor(ts, dtype=torch.float64)).tolist()
    return (1.0, *inner, 0.0)
