"""A diffusers scheduler's loop on a network, as a pipeline runs it: the ODE-solver baselines on a teacher at the
same number of network evaluations (NFE) as a few-step student. The schedulers are built by name in
`proreflow.schedulers`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from proreflow.errors import ProReflowError
from proreflow.fields.network import call_network, guided_call

@torch.no_grad()
def scheduler_sample(net: nn.Module, scheduler: Any, noise: Tensor, steps: int, cond: Any = None,
                     guidance_scale: float = 1.0) -> Tensor:
    """Sample with a diffusers scheduler loop (as a pipeline does), one NFE per step (two with CFG)."""
    if steps < 1:
        raise ProReflowError(f"steps must be >= 1, got {steps}")
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    for ts in scheduler.timesteps:
        tt = ts.expand(x.shape[0]).to(torch.float32)
        model_in = scheduler.scale_model_input(x, ts)
        out = guided_call(lambda c: call_network(net, model_in, tt, c), cond, guidance_scale)
        x = scheduler.step(out, ts, x).prev_sample
    return x
