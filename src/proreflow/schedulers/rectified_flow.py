"""InstaFlow / 2-rectified flow (Liu et al. 2023; hub `XCLiu/instaflow_0_9B_from_sd_1_5`,
`XCLiu/2_rectified_flow_from_sd_1_5`) as a diffusers scheduler: UNets that predict the velocity from noise
to data, sampled by Euler from tau = 1 with the UNet told tau*T."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor

from proreflow.errors import ProReflowError
from proreflow.schedulers.common import FlowSchedulerOutput, _TimestepIndex


class RectifiedFlowScheduler(SchedulerMixin, ConfigMixin, _TimestepIndex):
    """Euler sampler of InstaFlow / 2-rectified flow: the UNet predicts v = d x / d(-tau) (noise to data),
    tau goes 1 -> 0 in equal steps, the UNet is told tau*T, and x <- x + v / N."""

    _compatibles: list[str] = []  # a velocity UNet with no betas in its config: no diffusers sampler fits it
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000) -> None:
        self.init_noise_sigma = 1.0
        self.set_timesteps(1)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        if num_inference_steps < 1:
            raise ProReflowError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        n, big_t = num_inference_steps, self.config.num_train_timesteps
        self.taus = torch.tensor([1 - i / n for i in range(n)] + [0.0], dtype=torch.float64)
        self.timesteps = (self.taus[:-1] * big_t).to(device=device, dtype=torch.float32)
        self.num_inference_steps = n
        self._step_index = None

    def scale_model_input(self, sample: Tensor, timestep: Any = None) -> Tensor:
        return sample

    def step(self, model_output: Tensor, timestep: Any, sample: Tensor,
             return_dict: bool = True) -> FlowSchedulerOutput | tuple:
        i = self._index(timestep)
        tau, tau_next = float(self.taus[i]), float(self.taus[i + 1])
        v = model_output.to(sample.dtype)
        prev = sample + (tau - tau_next) * v
        if not return_dict:
            return (prev,)
        return FlowSchedulerOutput(prev_sample=prev, pred_original_sample=sample + tau * v)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
