"""PeRFlow's released checkpoints (Yan et al. 2024; hub `hansyan/perflow-*`) as a diffusers scheduler.

SD-shaped UNets that still predict a noise, which the sampler turns into one straight segment per time
window. `PiecewiseFlowScheduler` implements the sampling rule of the released checkpoints: K uniform windows
in PeRFlow's time tau (1 = noise), the UNet sees timestep tau*T (1000 at the start), window ends read
alphas_cumprod at tau*T - 1, and the noise is read in one of three parametrisations (`prediction_type`):
- "diff_eps" (SD1.5 checkpoints and delta weights; PeRFlow's early code called it "epsilon"): the noise that
  carries the window end to the window start, x_s = sqrt(a_s/a_e) x_e + sqrt(1 - a_s/a_e) eps;
- "ddim_eps" (SDXL checkpoints): the noise of a DDIM step from the window start to its end;
- "velocity" (the SD2.1 checkpoint, hansyan/perflow-sd21-artius, in PeRFlow's own script): the segment's
  velocity itself.
With one step per window, "ddim_eps" is exactly DDIM at the trailing timesteps 999, 749, 499, 249 (tested
against diffusers' DDIMScheduler), except that the UNet is told 1000, 750, 500, 250.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from torch import Tensor

from proreflow.errors import ProReflowError
from proreflow.schedulers.common import FlowSchedulerOutput, _TimestepIndex

#: PeRFlow's noise parametrisations; "epsilon" is the name PeRFlow's first release gave "diff_eps"
PERFLOW_PREDICTIONS = ("diff_eps", "ddim_eps", "velocity")
_ALIASES = {"epsilon": "diff_eps"}


class PiecewiseFlowScheduler(SchedulerMixin, ConfigMixin, _TimestepIndex):
    """The sampler of PeRFlow's released checkpoints (see the module docstring).

    `num_inference_steps` >= `num_windows`; extra steps go to the earliest (noisiest) windows first, and
    each window is walked in equal steps along its straight segment. The beta settings must be the
    base model's (a pipeline's own scheduler config carries them: `from_config(pipe.scheduler.config)`).
    """

    # its config holds the base model's betas, so diffusers' samplers load from it (`pipe.scheduler.compatibles`)
    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear", trained_betas: list[float] | None = None,
                 prediction_type: str = "diff_eps", num_windows: int = 4) -> None:
        prediction_type = _ALIASES.get(prediction_type, prediction_type)
        if prediction_type not in PERFLOW_PREDICTIONS:
            raise ProReflowError(f"unknown PeRFlow prediction_type {prediction_type!r}; use one of "
                                 f"{list(PERFLOW_PREDICTIONS)} (diff_eps: SD1.5 checkpoints, ddim_eps: SDXL, velocity: SD2.1)")
        if num_windows < 1 or num_train_timesteps % num_windows:
            raise ProReflowError(f"num_windows must divide num_train_timesteps ({num_train_timesteps}), got {num_windows}")
        self.register_to_config(prediction_type=prediction_type)
        betas = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                              beta_schedule=beta_schedule, trained_betas=trained_betas)
        self.alphas_cumprod = betas.alphas_cumprod.double()
        self.init_noise_sigma = 1.0
        self.set_timesteps(num_windows)

    def window_bounds(self, k: int) -> tuple[float, float]:
        """Window k (0 = noisiest) as (start, end) in tau, start > end."""
        n = self.config.num_windows
        return (n - k) / n, (n - k - 1) / n

    def _alpha_bar(self, tau: float) -> float:
        """alphas_cumprod at a window boundary, read at index tau*T - 1 as the released sampler does."""
        idx = max(round(tau * self.config.num_train_timesteps) - 1, 0)
        return float(self.alphas_cumprod[idx])

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        k = self.config.num_windows
        if num_inference_steps < k:
            raise ProReflowError(f"num_inference_steps must be at least the checkpoint's {k} windows (one Euler "
                                 f"step each), got {num_inference_steps}")
        big_t = self.config.num_train_timesteps
        steps, windows = [], []
        for w in range(k):
            per = num_inference_steps // k + (1 if w < num_inference_steps % k else 0)
            start, end = self.window_bounds(w)
            # the released grid: numpy's linspace times T, truncated by the int64 cast, float error included
            # (20 steps give 99 and 49, not 100 and 50); tau, and so every step size, follows from these integers
            steps += (np.linspace(start, end, per, endpoint=False) * big_t).astype(np.int64).tolist()
            windows += [w] * per
        self._windows = windows
        self.timesteps = torch.tensor(steps, dtype=torch.int64, device=device)
        self.num_inference_steps = num_inference_steps
        self._step_index = None

    def scale_model_input(self, sample: Tensor, timestep: Any = None) -> Tensor:
        return sample

    def window_end_map(self, k: int) -> tuple[float, float]:
        """(a, b) with x_end = a * x_start + b * eps for window k under this prediction type."""
        a_s, a_e = (self._alpha_bar(t) for t in self.window_bounds(k))
        a = (a_e / a_s) ** 0.5
        if self.config.prediction_type == "ddim_eps":  # x0 from (x_s, eps) at a_s, re-noised with eps to a_e
            return a, (1 - a_e) ** 0.5 - (a_e * (1 - a_s) / a_s) ** 0.5
        return a, -(a_e / a_s - 1) ** 0.5  # diff_eps: invert x_s = sqrt(a_s/a_e) x_e + sqrt(1 - a_s/a_e) eps

    def velocity(self, model_output: Tensor, sample: Tensor, i: int) -> Tensor:
        """The segment velocity d x / d tau at step i (the window end is on the segment through the sample)."""
        if self.config.prediction_type == "velocity":
            return model_output
        k = self._windows[i]
        start, end = self.window_bounds(k)
        tau = float(self.timesteps[i]) / self.config.num_train_timesteps
        r = (start - tau) / (start - end)  # how far along the window the sample is, in [0, 1)
        a, b = self.window_end_map(k)
        # x_c = (1 - r) x_s + r x_e and x_e = a x_s + b eps  =>  x_e = (a x_c + (1 - r) b eps) / (1 - r + a r)
        x_end = (a * sample + (1 - r) * b * model_output) / (1 - r + a * r)
        return (x_end - sample) / (end - tau)

    def step(self, model_output: Tensor, timestep: Any, sample: Tensor,
             return_dict: bool = True) -> FlowSchedulerOutput | tuple:
        i = self._index(timestep)
        tau = float(self.timesteps[i]) / self.config.num_train_timesteps
        tau_next = float(self.timesteps[i + 1]) / self.config.num_train_timesteps if i + 1 < len(self.timesteps) else 0.0
        v = self.velocity(model_output.to(sample.dtype), sample, i)
        prev = sample + (tau_next - tau) * v
        if not return_dict:
            return (prev,)
        return FlowSchedulerOutput(prev_sample=prev)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


def perflow_scheduler(config: Any, prediction_type: str = "diff_eps", num_windows: int = 4) -> PiecewiseFlowScheduler:
    """A PiecewiseFlowScheduler with the betas of a pipeline's scheduler `config`."""
    get = config.get if hasattr(config, "get") else (lambda k, d=None: getattr(config, k, d))
    return PiecewiseFlowScheduler(
        num_train_timesteps=get("num_train_timesteps", 1000), beta_start=get("beta_start", 0.00085),
        beta_end=get("beta_end", 0.012), beta_schedule=get("beta_schedule", "scaled_linear"),
        trained_betas=get("trained_betas", None), prediction_type=prediction_type, num_windows=num_windows)
