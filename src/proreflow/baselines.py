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

#: name -> (diffusers class, settings laid over the model's own scheduler config). DDIM: a config that
#: lacks `clip_sample` (one written for another scheduler class may) gets DDIM's default, True, which
#: would clip predicted latents to [-1, 1]. DPM-Solver (not ++): diffusers refuses its default final sigma of zero for it.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {"clip_sample": False}),
    "euler": ("EulerDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {"solver_order": 2}),
    "lcm": ("LCMScheduler", {}),
}
#: solvers whose step grid follows `timestep_spacing` (LCM has its own grid)
SPACED = ("ddim", "euler", "dpmsolver", "dpmsolver++", "unipc")


def check_overrides(name: str, overrides: dict[str, Any] | None) -> None:
    """Every key of `overrides` must be a setting of scheduler `name`'s class: diffusers' from_config drops
    unknown keys silently, so a misspelt one would sample with the scheduler's defaults under the run's name."""
    import difflib
    import inspect

    import diffusers

    if not overrides:
        return
    cls_name = SCHEDULERS[name][0]
    known = [k for k in inspect.signature(getattr(diffusers, cls_name).__init__).parameters if k not in ("self", "kwargs")]
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; it has {', '.join(known)}"
            raise ProReflowError(f"unknown setting {key!r} of the {name!r} scheduler ({cls_name}){hint}")


def make_scheduler(name: str, config: Any, timestep_spacing: str | None = "trailing", flow: bool = False,
                   overrides: dict[str, Any] | None = None):
    """The diffusers scheduler `name` built from a model's scheduler config (a pipeline's, or the DDPM
    config a teacher was trained with), so betas and prediction type carry over.

    `timestep_spacing` replaces the config's for the solvers in SPACED ("trailing": start at the
    noisiest timestep, as our windowed sampler does; None keeps the config's). `flow=True` configures
    the solver for a velocity (flow-matching) network instead of an eps one. Our settings are passed
    as keyword overrides: written into the config dict instead, diffusers would reset those listed in
    its `_use_default_values` to their defaults. `overrides` are laid over everything else.
    """
    import diffusers

    if name not in SCHEDULERS:
        raise ProReflowError(f"unknown scheduler {name!r}; use one of {list(SCHEDULERS)}")
    check_overrides(name, overrides)
    cls_name, settings = SCHEDULERS[name]
    settings = dict(settings)
    if name in SPACED and timestep_spacing is not None:
        settings["timestep_spacing"] = timestep_spacing
    if flow:
        settings.update(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0)
    settings.update(overrides or {})  # a user's settings (e.g. a student's beta_schedule) win over ours
    try:
        return getattr(diffusers, cls_name).from_config(config, **settings)
    except (ValueError, TypeError, AttributeError, NotImplementedError) as exc:
        origin = config.get("_class_name", "given") if hasattr(config, "get") else "given"
        raise ProReflowError(f"cannot build the {name!r} scheduler ({cls_name}) from the {origin} scheduler "
                             f"config: {str(exc).splitlines()[0][:200]}") from None


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
