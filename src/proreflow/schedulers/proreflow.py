"""Our students' sampler as a diffusers scheduler.

`ProReflowScheduler` (SchedulerMixin + ConfigMixin: `save_pretrained`, `from_pretrained`, `from_config`)
steps window to window with Euler in our flow time and hands the pipeline latents in the diffusion's own
coordinates, so a stock `StableDiffusionPipeline` / `StableDiffusionXLPipeline` runs the student unchanged,
with one or several (m) Euler steps per window.
"""

from __future__ import annotations

import operator
from typing import Any, Sequence

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from torch import Tensor

from proreflow.conventions import check_prediction_type, flow_of_vp, output_to_velocity
from proreflow.errors import ProReflowError
from proreflow.fields.vp import VPSchedule, trailing_grid
from proreflow.schedulers.common import FlowSchedulerOutput
from proreflow.windows import WindowSchedule


class ProReflowScheduler(SchedulerMixin, ConfigMixin):
    """Windowed Euler sampler for ProReflow/PeRFlow students with a VP (eps / v) parametrisation.

    `window_boundaries` are the student's final-stage windows in flow time (1 = noise, 0 = data);
    `num_inference_steps` must be a multiple of the window count (one or more Euler steps per
    window). The beta settings must be the teacher's: they define the t <-> timestep map.
    """

    # its config holds a VP teacher's betas, so diffusers' samplers load from it (`pipe.scheduler.compatibles`)
    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear", trained_betas: list[float] | None = None,
                 prediction_type: str = "epsilon", window_boundaries: Sequence[float] | None = None,
                 num_windows: int = 4) -> None:
        self.vp = _vp_of(dict(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                              beta_schedule=beta_schedule, trained_betas=trained_betas))
        self.windows = (WindowSchedule(tuple(window_boundaries)) if window_boundaries is not None
                        else WindowSchedule.uniform(num_windows))
        if self.windows.num_windows != num_windows:  # the boundaries decide (configs saved before this said 4)
            self.register_to_config(num_windows=self.windows.num_windows)
        check_prediction_type(prediction_type)
        self.set_timesteps(self.windows.num_windows)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        per = self.windows.steps_per_window(operator.index(num_inference_steps))  # numpy ints too, not floats
        # pure noise enters at the noisiest timestep as x = eps (what SD was trained on and every diffusers
        # sampler feeds), i.e. at flow time t_max, not 1 (docs/design.md §1)
        b = self.windows.entered_at(self.vp.t_max)
        times = [t_a + (t_b - t_a) * j / per for t_a, t_b in zip(b[:-1], b[1:]) for j in range(per)] + [0.0]
        self.flow_times = torch.tensor(times, dtype=torch.float64)
        self._timesteps64 = self.vp.timestep_of_t(self.flow_times[:-1])
        self._timesteps64[0] = float(self.vp.num_train_timesteps - 1)  # exactly 999, not the bisection's 999 - 1e-13
        self.timesteps = self._timesteps64.to(device=device, dtype=torch.float32)
        self.num_inference_steps = num_inference_steps
        self.init_noise_sigma = 1.0  # x_999 = eps: pipelines feed N(0, I) as it is
        self._step_index = 0

    def scale_model_input(self, sample: Tensor, timestep: Any = None) -> Tensor:
        return sample

    def step(self, model_output: Tensor, timestep: Any, sample: Tensor,
             return_dict: bool = True) -> FlowSchedulerOutput | tuple:
        """One Euler step in flow time: x_tau -> y, y += (t_next - t) v, y -> x_tau at the next timestep."""
        i = self._step_index
        if i >= self.num_inference_steps:
            raise ProReflowError("step() called more times than num_inference_steps; call set_timesteps() again")
        alpha, sigma = (v.to(sample.device, sample.dtype) for v in self.vp.alpha_sigma(self._timesteps64[i:i + 1]))
        x = sample
        v = output_to_velocity(model_output.to(x.dtype), x, alpha.expand(x.shape[0]), sigma.expand(x.shape[0]),
                               self.config.prediction_type)
        y, _ = flow_of_vp(x, alpha, sigma)
        t, t_next = float(self.flow_times[i]), float(self.flow_times[i + 1])
        y_next = y + (t_next - t) * v
        if i + 1 < self.num_inference_steps:
            scale = self.vp.scale(self._timesteps64[i + 1:i + 2]).to(x.device, x.dtype)
        else:
            scale = torch.ones(1, dtype=x.dtype, device=x.device)  # t = 0: y is the data itself
        prev = y_next * scale
        x0 = y - t * v
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return FlowSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


def scheduler_for(config: Any, windows: WindowSchedule, prediction_type: str | None = None) -> ProReflowScheduler:
    """A ProReflowScheduler with the betas of a teacher's scheduler `config` (`pipe.scheduler.config`, or a
    plain dict of it) and the student's windows."""
    return ProReflowScheduler(
        num_train_timesteps=config["num_train_timesteps"], beta_start=config["beta_start"],
        beta_end=config["beta_end"], beta_schedule=config["beta_schedule"], trained_betas=config.get("trained_betas"),
        prediction_type=prediction_type or config.get("prediction_type", "epsilon"),
        window_boundaries=list(windows.boundaries), num_windows=windows.num_windows)


def _vp_of(config: Any) -> VPSchedule:
    """The VP schedule of a teacher's scheduler config (its betas through diffusers' own DDIMScheduler)."""
    ddim = DDIMScheduler(num_train_timesteps=config["num_train_timesteps"], beta_start=config["beta_start"],
                         beta_end=config["beta_end"], beta_schedule=config["beta_schedule"],
                         trained_betas=config.get("trained_betas"))
    return VPSchedule(ddim.alphas_cumprod)


def timestep_windows(config: Any, num_windows: int) -> WindowSchedule:
    """`num_windows` windows at a VP teacher's timesteps, starting exactly where `DDIMScheduler(timestep_spacing=
    "trailing")` evaluates the UNet in K steps: round(T - j T/K) - 1 (999/749/499/249 for K = 4; 999/968/937/905/...
    for 32). Where K divides T these are the presets' `timestep_placement` boundaries."""
    return WindowSchedule(trailing_grid(_vp_of(config), num_windows))


def stock_scheduler_for(config: Any, windows: WindowSchedule, prediction_type: str | None = None) -> Any | None:
    """diffusers' own DDIMScheduler when it samples a VP student exactly (else None): the windows start where
    DDIM with trailing spacing steps in K steps, and `set_alpha_to_one=True` makes its last step land on the
    data (t = 0) as ours does. Euler in our flow time and DDIM are then the same step (docs/design.md §1),
    so the exported student needs nothing but diffusers. At m*K steps DDIM sub-steps uniformly in timesteps
    where `ProReflowScheduler` sub-steps uniformly in flow time; at K steps the two agree to float rounding."""
    vp, k = _vp_of(config), windows.num_windows
    T = vp.num_train_timesteps
    if T % k:
        return None  # DDIM then steps its alphas by T // K but evaluates rounded timesteps: not one Euler step each
    placed = WindowSchedule(trailing_grid(vp, k))  # where DDIM trailing steps (`timestep_windows`)
    if any(abs(a - b) > 1e-7 for a, b in zip(placed.boundaries, windows.boundaries)):
        return None
    return DDIMScheduler.from_config(
        {k_: v for k_, v in dict(config).items() if not k_.startswith("_")},
        timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False, thresholding=False,
        prediction_type=prediction_type or config.get("prediction_type", "epsilon"))


class ProReflowFlowScheduler(FlowMatchEulerDiscreteScheduler):
    """Windowed Euler for students of flow-matching teachers (SD3-style transformers), as a diffusers scheduler.

    Such a network predicts our velocity at sigma = flow time, and FlowMatchEulerDiscreteScheduler's step is
    already an Euler step in sigma, so only the sigmas change: the student's window boundaries, m per window,
    with no time shift (the windows are where the student was trained; `shift` would move them).
    """

    _compatibles = ["FlowMatchEulerDiscreteScheduler"]

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, window_boundaries: Sequence[float] | None = None,
                 num_windows: int = 4) -> None:
        super().__init__(num_train_timesteps=num_train_timesteps, shift=1.0)
        self.windows = (WindowSchedule(tuple(window_boundaries)) if window_boundaries is not None
                        else WindowSchedule.uniform(num_windows))
        self.set_timesteps(self.windows.num_windows)

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas: Any = None, mu: float | None = None, timesteps: Any = None) -> None:
        """m steps per window for `num_inference_steps` = m K. FluxPipeline passes no count but its uniform sigmas
        linspace(1, 1/N, N) (and mu): those are read as N steps, and the shift they ask for is the windows' own."""
        if sigmas is not None and timesteps is None:
            n = len(sigmas)
            if n < 1 or any(abs(float(x) - (1.0 - j / n)) > 1e-6 for j, x in enumerate(sigmas)):
                raise ProReflowError("ProReflowFlowScheduler samples its student's windows; it takes a step count "
                                     "or a pipeline's uniform sigmas linspace(1, 1/N, N), not other sigmas")
            num_inference_steps = n
        elif sigmas is not None or timesteps is not None:
            raise ProReflowError("ProReflowFlowScheduler samples its student's windows; it takes only a step count")
        per = self.windows.steps_per_window(operator.index(num_inference_steps or self.windows.num_windows))
        b = self.windows.boundaries
        starts = [t_a + (t_b - t_a) * j / per for t_a, t_b in zip(b[:-1], b[1:]) for j in range(per)]
        super().set_timesteps(sigmas=starts, device=device)
        self.num_inference_steps = len(starts)


def flow_scheduler_for(config: Any, windows: WindowSchedule) -> ProReflowFlowScheduler:
    """A ProReflowFlowScheduler for a flow-matching teacher's scheduler `config` and the student's windows."""
    return ProReflowFlowScheduler(num_train_timesteps=config["num_train_timesteps"],
                                  window_boundaries=list(windows.boundaries), num_windows=windows.num_windows)
