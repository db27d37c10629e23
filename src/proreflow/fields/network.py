"""Trained velocity networks used as teachers or students, and how diffusers networks are called.

- `NetworkTeacher`: freezes any `net(x, t, cond) -> v` and calls it without autograd.
- `FlowVelocity`: a diffusers network trained to predict our velocity directly (a digits UNet2DModel,
  SD3's `SD3Transformer2DModel` with `FlowMatchEulerDiscreteScheduler`): these already live in our
  convention (x_t = (1 - t) x0 + t eps, output eps - x0), so t is the scheduler's sigma and the
  network's timestep is t * num_train_timesteps; no change of variables.
- `call_network` / `guided_call`: one way to call a diffusers UNet or transformer with our flat
  conditioning dict, and classifier-free guidance on raw outputs; shared with the VP adapter.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any, Callable

import torch
from torch import Tensor, nn

from proreflow.cond import map_cond
from proreflow.conventions import PURE_NOISE, ModuleField
from proreflow.errors import ProReflowError
from proreflow.store import module_digest


class NetworkTeacher:
    """Wraps `net(x, t, cond) -> v` (our convention) as a frozen velocity field (a `conventions.Teacher`)."""

    noise_entry = PURE_NOISE

    def __init__(self, net: nn.Module) -> None:
        self.net = net.eval().requires_grad_(False)

    def fingerprint(self) -> str | None:
        return module_digest(self.net, "frozen")[:16]

    @torch.no_grad()
    def __call__(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        p = next(self.net.parameters())
        return self.net(x.to(p.dtype), t.to(p.dtype), cond).to(x.dtype)


def to_network(net: nn.Module) -> Callable[[Tensor], Tensor]:
    """Tensor -> the network's device (and dtype, for floating tensors): a teacher kept on the GPU, or
    in bf16 weights, is called with CPU / fp32 pairs outside autocast; a no-op when they already agree."""
    p = next(net.parameters(), None) if isinstance(net, nn.Module) else None
    if p is None:  # a plain function (analytic test networks): nothing to match
        return lambda v: v
    return lambda v: v.to(p.device, p.dtype) if v.is_floating_point() else v.to(p.device)


@lru_cache(maxsize=None)
def _forward_params(cls: type) -> frozenset[str] | None:
    """The keyword names a network's forward takes; None when it takes any (**kwargs) or is not a module."""
    forward = getattr(cls, "forward", None)
    if forward is None:
        return None
    params = inspect.signature(forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return frozenset(params)


def network_kwargs(net: Any, cond: Any) -> dict[str, Any]:
    """Keyword arguments for a diffusers network from our flat conditioning dict (`uncond` dropped), by the
    network's signature: entries its forward names go as keywords, the others into `added_cond_kwargs` when it
    takes that (SDXL's `text_embeds` and `time_ids`), else a clear error. No family is named here: the
    conditioning a family encodes meets the network it encodes for."""
    params = _forward_params(type(net))
    kwargs: dict[str, Any] = {}
    added: dict[str, Any] = {}
    for k, v in (cond or {}).items():
        if k == "uncond":
            continue
        if params is None or k in params:
            kwargs[k] = v
        elif "added_cond_kwargs" in params:
            added[k] = v
        else:
            raise ProReflowError(f"{type(net).__name__} takes no conditioning {k!r} (it takes "
                                 f"{', '.join(sorted(params - {'self'}))})")
    if added:
        kwargs["added_cond_kwargs"] = {**kwargs.get("added_cond_kwargs", {}), **added}
    return kwargs


def _takes_hidden_states(cls: type) -> bool:
    """Transformers (SD3, ...) name their input `hidden_states`; UNets take `sample` first. A rule of the
    network's signature (digits UNets and SD3 transformers alike), not of a pipeline family."""
    params = _forward_params(cls)
    return params is not None and "hidden_states" in params and "sample" not in params


def call_network(net: nn.Module, x: Tensor, timestep: Tensor, cond: Any) -> Tensor:
    """The raw output of a diffusers UNet or transformer at `timestep`, on x's device."""
    cast = to_network(net)
    kwargs = network_kwargs(net, map_cond({k: v for k, v in (cond or {}).items() if k != "uncond"}, cast))
    ts = timestep.to(cast(x).device)
    out = net(hidden_states=cast(x), timestep=ts, **kwargs) if _takes_hidden_states(type(net)) \
        else net(cast(x), ts, **kwargs)
    out = out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, tuple) else out)
    return out.to(x.device)


def guided_call(call: Callable[[Any], Tensor], cond: Any, scale: float) -> Tensor:
    """out_u + scale (out_c - out_u) when scale != 1 and `cond` carries an `uncond` dict; else out_c.

    The paper trains students at scale 1 and applies guidance only when sampling."""
    out = call(cond)
    if scale != 1.0 and isinstance(cond, dict) and cond.get("uncond") is not None:
        out_u = call(cond["uncond"])
        out = out_u + scale * (out - out_u)
    return out


class FlowVelocity(ModuleField, nn.Module):
    """A diffusers network that predicts our velocity eps - x0 at timestep t * time_scale, as a
    velocity field v(x, t, cond) (teacher or student).

    `cond` is a flat dict of the network's keyword arguments (`class_labels`, `encoder_hidden_states`,
    `pooled_projections`, ...), optionally with `uncond` (same form) for classifier-free guidance at
    `guidance_scale`.
    """

    def __init__(self, net: nn.Module, time_scale: float = 1000.0, guidance_scale: float = 1.0) -> None:
        super().__init__()
        self.net, self.time_scale, self.guidance_scale = net, time_scale, guidance_scale

    @classmethod
    def from_scheduler(cls, net: nn.Module, scheduler: Any, guidance_scale: float = 1.0) -> "FlowVelocity":
        """For a network trained with a flow-matching scheduler (FlowMatchEulerDiscreteScheduler)."""
        if not hasattr(scheduler, "sigmas") or "shift" not in scheduler.config:
            raise ProReflowError(f"{type(scheduler).__name__} is not a flow-matching scheduler "
                                 f"(use FlowMatchEulerDiscreteScheduler, or VPVelocity for eps/v models)")
        return cls(net, float(scheduler.config.num_train_timesteps), guidance_scale)

    def forward(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        ts = (t * self.time_scale).to(x.device, torch.float32)
        return guided_call(lambda c: call_network(self.net, x, ts, c), cond, self.guidance_scale).to(x.dtype)
