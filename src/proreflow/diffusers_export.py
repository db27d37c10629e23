"""Export a student so that diffusers pipelines sample it in a few steps.

`ProReflowScheduler` is a diffusers scheduler (SchedulerMixin + ConfigMixin: `save_pretrained`,
`from_pretrained`, `from_config`) that steps window to window with Euler in our flow time and
hands the pipeline latents in the diffusion's own coordinates, so a stock
`StableDiffusionPipeline` / `StableDiffusionXLPipeline` runs the student unchanged:

    pipe = StableDiffusionPipeline.from_pretrained(out_dir)   # unet = the student
    image = pipe(prompt, num_inference_steps=4, guidance_scale=4).images[0]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers import DDIMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from torch import Tensor

from proreflow.errors import ProReflowError
from proreflow.teachers.vp import VPSchedule, output_to_velocity
from proreflow.windows import WindowSchedule


@dataclass
class ProReflowSchedulerOutput(BaseOutput):
    prev_sample: Tensor
    pred_original_sample: Tensor | None = None


class ProReflowScheduler(SchedulerMixin, ConfigMixin):
    """Windowed Euler sampler for ProReflow/PeRFlow students with a VP (eps / v) parametrisation.

    `window_boundaries` are the student's final-stage windows in flow time (1 = noise, 0 = data);
    `num_inference_steps` must be a multiple of the window count (one or more Euler steps per
    window). The beta settings must be the teacher's: they define the t <-> timestep map.
    """

    _compatibles: list[str] = []
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear", trained_betas: list[float] | None = None,
                 prediction_type: str = "epsilon", window_boundaries: Sequence[float] | None = None,
                 num_windows: int = 4) -> None:
        ddim = DDIMScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                             beta_schedule=beta_schedule, trained_betas=trained_betas, prediction_type=prediction_type)
        self.vp = VPSchedule(ddim.alphas_cumprod)
        self.windows = (WindowSchedule(tuple(window_boundaries)) if window_boundaries is not None
                        else WindowSchedule.uniform(num_windows))
        if self.windows.num_windows != num_windows:  # the boundaries decide (configs saved before this said 4)
            self.register_to_config(num_windows=self.windows.num_windows)
        if prediction_type not in ("epsilon", "v_prediction", "flow"):
            raise ProReflowError(f"unknown prediction_type {prediction_type!r}; use epsilon, v_prediction or flow")
        self.set_timesteps(self.windows.num_windows)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        k = self.windows.num_windows
        if num_inference_steps < 1 or num_inference_steps % k:
            raise ProReflowError(f"num_inference_steps must be a positive multiple of the student's {k} windows, "
                                 f"got {num_inference_steps}")
        per = num_inference_steps // k
        b = self.windows.boundaries
        times = [t_a + (t_b - t_a) * j / per for t_a, t_b in zip(b[:-1], b[1:]) for j in range(per)] + [0.0]
        self.flow_times = torch.tensor(times, dtype=torch.float64)
        self._timesteps64 = self.vp.timestep_of_t(self.flow_times[:-1])
        self.timesteps = self._timesteps64.to(device=device, dtype=torch.float32)
        self.num_inference_steps = num_inference_steps
        self.init_noise_sigma = float(self.vp.scale(self._timesteps64[:1]))  # pipelines scale N(0, I) by this
        self._step_index = 0

    def scale_model_input(self, sample: Tensor, timestep: Any = None) -> Tensor:
        return sample

    def step(self, model_output: Tensor, timestep: Any, sample: Tensor,
             return_dict: bool = True) -> ProReflowSchedulerOutput | tuple:
        """One Euler step in flow time: x_tau -> y, y += (t_next - t) v, y -> x_tau at the next timestep."""
        i = self._step_index
        if i >= self.num_inference_steps:
            raise ProReflowError("step() called more times than num_inference_steps; call set_timesteps() again")
        alpha, sigma = (v.to(sample.device, sample.dtype) for v in self.vp.alpha_sigma(self._timesteps64[i:i + 1]))
        x = sample
        v = output_to_velocity(model_output.to(x.dtype), x, alpha.expand(x.shape[0]), sigma.expand(x.shape[0]),
                               self.config.prediction_type)
        y = x / (alpha + sigma)
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
        return ProReflowSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


def load_diffusers_pipeline(model: str, what: str = "the model", pipeline_class: str | None = None,
                            **kwargs: Any) -> Any:
    """`DiffusionPipeline.from_pretrained(model)` (or `pipeline_class`'s) without a safety checker, with a clear
    error when it cannot be loaded. Exported students load in a fresh process: diffusers resolves
    `proreflow.ProReflowScheduler` only from modules already imported, and this one is (it defines the class)."""
    import diffusers

    cls = getattr(diffusers, pipeline_class or "DiffusionPipeline", None)
    if cls is None:
        raise ProReflowError(f"diffusers has no pipeline class {pipeline_class!r} (for {what} {model!r})")
    try:
        return cls.from_pretrained(model, safety_checker=None, requires_safety_checker=False, **kwargs)
    except AttributeError as exc:
        if "module diffusers has no attribute" not in str(exc):
            raise
        raise ProReflowError(
            f"cannot load {what} {model!r}: its model_index.json names a pipeline class diffusers lacks ({exc}). "
            f"Name a diffusers class whose components it has, e.g. pipeline: StableDiffusionPipeline in the suite "
            f"row (--pipeline StableDiffusionPipeline)") from None
    except (OSError, ValueError) as exc:
        raise ProReflowError(
            f"cannot load {what} {model!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). Pass a local "
            f"diffusers folder, or download it once with network access (it is then read from the HF cache; set "
            f"HF_HUB_OFFLINE=1 to use the cache only)") from None


def scheduler_for(teacher_scheduler: Any, windows: WindowSchedule, prediction_type: str | None = None) -> ProReflowScheduler:
    """A ProReflowScheduler with the teacher scheduler's betas and the student's windows."""
    cfg = teacher_scheduler.config
    return ProReflowScheduler(
        num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule, trained_betas=cfg.get("trained_betas"),
        prediction_type=prediction_type or cfg.get("prediction_type", "epsilon"),
        window_boundaries=list(windows.boundaries), num_windows=windows.num_windows)


def export_pipeline(pipe: Any, student_unet: Any, windows: WindowSchedule, out_dir: str | Path) -> Path:
    """Save `pipe` with the student UNet and a ProReflowScheduler; load it back with `from_pretrained`."""
    pipe.unet = student_unet
    pipe.scheduler = scheduler_for(pipe.scheduler, windows)
    pipe.register_modules(unet=student_unet, scheduler=pipe.scheduler)
    out = Path(out_dir)
    pipe.save_pretrained(out, safe_serialization=True)
    return out
