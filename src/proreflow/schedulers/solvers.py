"""Diffusers' ODE solvers (DDIM, Euler, DPM-Solver(++), UniPC, LCM, TCD) by name, built from a model's own
scheduler config so that betas and prediction type carry over. Every spaced solver uses "trailing"
timesteps by default, so that sampling starts at the noisiest timestep, as our windowed sampler does.
"""

from __future__ import annotations

import math
from typing import Any

from proreflow.errors import ProReflowError

#: name -> (diffusers class, settings laid over the model's own scheduler config). DDIM: a config that
#: lacks `clip_sample` (one written for another scheduler class may) gets DDIM's default, True, which
#: would clip predicted latents to [-1, 1]. DPM-Solver (not ++): diffusers refuses its default final sigma of zero for it.
SOLVERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {"clip_sample": False}),
    "euler": ("EulerDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {"solver_order": 2}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),  # PCM's and TCD's LoRAs; like LCM, its grid is its own
}
#: solvers whose step grid follows `timestep_spacing` (LCM and TCD have their own grids)
SPACED = ("ddim", "euler", "dpmsolver", "dpmsolver++", "unipc")


def check_overrides(name: str, overrides: dict[str, Any] | None) -> None:
    """Every key of `overrides` must be a setting of scheduler `name`'s class: diffusers' from_config drops
    unknown keys silently, so a misspelt one would sample with the scheduler's defaults under the run's name."""
    import difflib
    import inspect

    import diffusers

    if not overrides:
        return
    cls_name = SOLVERS[name][0]
    known = [k for k in inspect.signature(getattr(diffusers, cls_name).__init__).parameters if k not in ("self", "kwargs")]
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; it has {', '.join(known)}"
            raise ProReflowError(f"unknown setting {key!r} of the {name!r} scheduler ({cls_name}){hint}")
    for key, value in overrides.items():  # a NaN or infinite beta samples black images that then get scored
        values = value if isinstance(value, (list, tuple)) else [value]
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if any(not math.isfinite(v) for v in numbers):
            raise ProReflowError(f"setting {key!r} of the {name!r} scheduler must be finite, got {str(value)[:80]}")
        if key in ("beta_start", "beta_end") and any(not 0 < v < 1 for v in numbers):
            raise ProReflowError(f"setting {key!r} of the {name!r} scheduler must be in (0, 1), got {value}")


def make_solver(name: str, config: Any, timestep_spacing: str | None = "trailing", flow: bool = False,
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

    if name not in SOLVERS:
        raise ProReflowError(f"unknown scheduler {name!r}; use one of {list(SOLVERS)}")
    check_overrides(name, overrides)
    cls_name, settings = SOLVERS[name]
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
