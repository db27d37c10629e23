"""A trained velocity network used as a teacher: frozen, evaluated without autograd."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class NetworkTeacher:
    """Wraps `net(x, t, cond) -> v` (our convention) as a frozen velocity field."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net.eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        p = next(self.net.parameters())
        return self.net(x.to(p.dtype), t.to(p.dtype), cond).to(x.dtype)


class FlowTransformerVelocity(nn.Module):
    """A flow-matching diffusers network (SD3's `SD3Transformer2DModel` with
    `FlowMatchEulerDiscreteScheduler`) as a velocity field v(x, t, cond) (teacher or student).

    These models already live in our convention: x_sigma = (1 - sigma) x0 + sigma eps with
    sigma = 1 noise, and they predict eps - x0. So t is sigma, the network's timestep is
    sigma * num_train_timesteps, and the output is the velocity; no change of variables. `cond`
    holds the network's keyword arguments (`encoder_hidden_states`, `pooled_projections`) and, for
    classifier-free guidance with guidance_scale != 1, an `uncond` dict of the same form.
    """

    def __init__(self, transformer: nn.Module, num_train_timesteps: int = 1000, guidance_scale: float = 1.0) -> None:
        super().__init__()
        self.transformer, self.num_train_timesteps, self.guidance_scale = transformer, num_train_timesteps, guidance_scale

    @classmethod
    def from_scheduler(cls, transformer: nn.Module, scheduler: Any, guidance_scale: float = 1.0) -> "FlowTransformerVelocity":
        from proreflow.errors import ProReflowError

        if not hasattr(scheduler, "sigmas") or "shift" not in scheduler.config:
            raise ProReflowError(f"{type(scheduler).__name__} is not a flow-matching scheduler "
                                 f"(use FlowMatchEulerDiscreteScheduler, or VPVelocity for eps/v models)")
        return cls(transformer, scheduler.config.num_train_timesteps, guidance_scale)

    def _call(self, x: Tensor, timestep: Tensor, cond: Any) -> Tensor:
        from proreflow.pairs import map_cond
        from proreflow.teachers.vp import to_network

        cast = to_network(self.transformer)
        kwargs = {k: v for k, v in map_cond(cond or {}, cast).items() if k != "uncond"}
        out = self.transformer(hidden_states=cast(x), timestep=timestep.to(x.device), **kwargs)
        return (out.sample if hasattr(out, "sample") else out[0]).to(x.device)

    def forward(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        timestep = (t * self.num_train_timesteps).to(x.device, torch.float32)
        v = self._call(x, timestep, cond)
        if self.guidance_scale != 1.0 and isinstance(cond, dict) and cond.get("uncond") is not None:
            v_u = self._call(x, timestep, cond["uncond"])
            v = v_u + self.guidance_scale * (v - v_u)
        return v.to(x.dtype)
