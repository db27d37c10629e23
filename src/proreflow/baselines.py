"""ODE-solver baselines on a teacher: diffusers' multistep schedulers (DDIM, DPM-Solver++, UniPC)
and our own Euler/Heun, run at the same number of network evaluations (NFE) as a few-step student.

DDIM is not listed: on a VP teacher it is exactly our Euler step (DESIGN §1), reported as "euler (=DDIM)".
Every scheduler uses "trailing" timestep spacing so that sampling starts at the noisiest timestep,
as our windowed sampler does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from proreflow.errors import ProReflowError
from proreflow.teachers.flow import call_network, guided_call

#: name -> (diffusers class name, extra config) for multistep solvers (1 NFE per step)
DIFFUSERS_SOLVERS: dict[str, tuple[str, dict[str, Any]]] = {
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {"solver_order": 2}),
}


def make_scheduler(name: str, train_config: dict[str, Any], flow: bool = False):
    """A diffusers scheduler of kind `name` for a model trained with `train_config` (a DDPM config).

    `flow=True` configures it for a velocity (flow-matching) network instead of an eps one.
    """
    import diffusers

    if name not in DIFFUSERS_SOLVERS:
        raise ProReflowError(f"unknown scheduler {name!r}; choose one of {sorted(DIFFUSERS_SOLVERS)}")
    cls_name, extra = DIFFUSERS_SOLVERS[name]
    cls = getattr(diffusers, cls_name)
    # private keys (`_use_default_values`, ...) would make diffusers reset our overrides to defaults
    cfg = {k: v for k, v in train_config.items() if not k.startswith("_")}
    cfg.update(extra, timestep_spacing="trailing")
    if flow:
        cfg.update(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0)
    return cls.from_config(cfg)


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
