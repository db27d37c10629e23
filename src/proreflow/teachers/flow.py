"""Trained velocity networks used as teachers or students.

- `NetworkTeacher`: freezes any `net(x, t, cond) -> v` and calls it without autograd.
- `FlowVelocity`: a diffusers network (UNet2DModel, SD3-style transformer, ...) trained to predict
  our velocity directly, called with timestep = t * num_train_timesteps as diffusers' flow-match
  schedulers do, so the t mapping is the identity up to that scale.
- `guided_call`: classifier-free guidance on raw network outputs, shared with the VP adapter.
"""

from __future__ import annotations

from typing import Any, Callable

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


def call_network(net: nn.Module, x: Tensor, timestep: Tensor, cond: Any) -> Tensor:
    """`net(x, timestep, **cond)` without the `uncond` entry, unwrapping diffusers' output classes."""
    kwargs = {k: v for k, v in (cond or {}).items() if k != "uncond"}
    out = net(x, timestep, **kwargs)
    return out.sample if hasattr(out, "sample") else out


def guided_call(call: Callable[[Any], Tensor], cond: Any, scale: float) -> Tensor:
    """out_u + scale (out_c - out_u) when scale != 1 and `cond` carries an `uncond` dict; else out_c.

    The paper trains students at scale 1 and applies guidance only when sampling."""
    out = call(cond)
    if scale != 1.0 and isinstance(cond, dict) and cond.get("uncond") is not None:
        out_u = call(cond["uncond"])
        out = out_u + scale * (out - out_u)
    return out


class FlowVelocity(nn.Module):
    """A diffusers network that predicts our velocity eps - x0 at timestep t * time_scale.

    `cond` is a dict of keyword arguments for the network (`class_labels`, `encoder_hidden_states`,
    ...), optionally with `uncond` for classifier-free guidance at `guidance_scale`.
    """

    def __init__(self, net: nn.Module, time_scale: float = 1000.0, guidance_scale: float = 1.0) -> None:
        super().__init__()
        self.net, self.time_scale, self.guidance_scale = net, time_scale, guidance_scale

    def forward(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        ts = (t * self.time_scale).to(x.device, torch.float32)
        return guided_call(lambda c: call_network(self.net, x, ts, c), cond, self.guidance_scale).to(x.dtype)
