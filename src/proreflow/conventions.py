"""The single owner of the time/velocity convention (docs/design.md §1).

t = 0 is data, t = 1 is noise; the straight path is x_t = (1 - t) x0 + t eps and its
velocity is v = dx/dt = eps - x0. Sampling integrates from t = 1 down to t = 0.
Every other module goes through these helpers instead of re-deriving the algebra.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from proreflow.errors import ProReflowError


def expand_time(t: Tensor | float, like: Tensor) -> Tensor:
    """Broadcast a scalar or per-sample time of shape (B,) against a batch `like` of shape (B, ...)."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        return t
    return t.reshape(t.shape[0], *([1] * (like.ndim - 1)))


def interpolate(x0: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
    """Point x_t = (1 - t) x0 + t eps on the straight path between data and noise."""
    tt = expand_time(t, x0)
    return (1 - tt) * x0 + tt * eps


def path_velocity(x0: Tensor, eps: Tensor) -> Tensor:
    """Velocity dx/dt = eps - x0 of the straight path (t grows towards noise)."""
    return eps - x0


def split_velocity(x_t: Tensor, v: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor]:
    """Recover (x0, eps) from a point and its velocity: x0 = x_t - t v, eps = x_t + (1 - t) v."""
    tt = expand_time(t, x_t)
    return x_t - tt * v, x_t + (1 - tt) * v


def chord_velocity(x_a: Tensor, x_b: Tensor, t_a: Tensor | float, t_b: Tensor | float) -> Tensor:
    """Constant velocity that carries x_a at t_a to x_b at t_b in one Euler step."""
    return (x_a - x_b) / (expand_time(t_a, x_a) - expand_time(t_b, x_a))


# --- Gaussian diffusions (VP) in our flow: x_tau = alpha x0 + sigma eps is y = x_tau / (alpha + sigma) at
# t = sigma / (alpha + sigma). The only place this algebra is written; fields/vp.py and the schedulers call it.

PredictionType = Literal["epsilon", "v_prediction", "flow"]
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "flow")


def check_prediction_type(prediction_type: object) -> str:
    """`prediction_type` if this library converts its outputs (diffusers' epsilon and v_prediction, and "flow": our
    velocity itself), else a clear error."""
    if prediction_type not in PREDICTION_TYPES:
        raise ProReflowError(f"unknown prediction_type {prediction_type!r}; use epsilon, v_prediction or flow")
    return str(prediction_type)


def flow_time(alpha: Tensor, sigma: Tensor) -> Tensor:
    """Our flow time of a diffusion state with these alpha, sigma: t = sigma / (alpha + sigma)."""
    return sigma / (alpha + sigma)


def flow_scale(alpha: Tensor, sigma: Tensor) -> Tensor:
    """alpha + sigma, the factor between the coordinates: x_tau = (alpha + sigma) y."""
    return alpha + sigma


def flow_of_vp(x_tau: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(y, t): a diffusion state x_tau (alpha, sigma scalars or per sample) as a point of our flow."""
    a, s = expand_time(alpha, x_tau), expand_time(sigma, x_tau)
    return x_tau / (a + s), s / (a + s)


def vp_of_flow(y: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """x_tau = (alpha + sigma) y: a point of our flow in the diffusion's own coordinates."""
    return y * expand_time(alpha + sigma, y)


def output_to_x0_eps(output: Tensor, x_tau: Tensor, alpha: Tensor, sigma: Tensor,
                     prediction_type: PredictionType) -> tuple[Tensor, Tensor]:
    """(x0_hat, eps_hat) from a model output in the diffusion's own coordinates x_tau."""
    a, s = expand_time(alpha, x_tau), expand_time(sigma, x_tau)
    if prediction_type == "epsilon":
        eps = output
        return (x_tau - s * eps) / a, eps
    if prediction_type == "v_prediction":
        return a * x_tau - s * output, s * x_tau + a * output
    check_prediction_type(prediction_type)
    y, t = flow_of_vp(x_tau, alpha, sigma)  # "flow": the output is already our velocity in y coordinates
    return split_velocity(y, output, t)


def output_to_velocity(output: Tensor, x_tau: Tensor, alpha: Tensor, sigma: Tensor,
                       prediction_type: PredictionType) -> Tensor:
    """The one conversion of a model output to our velocity: eps_hat - x0_hat."""
    x0, eps = output_to_x0_eps(output, x_tau, alpha, sigma, prediction_type)
    return path_velocity(x0, eps)


def velocity_to_output(v: Tensor, x_tau: Tensor, alpha: Tensor, sigma: Tensor,
                       prediction_type: PredictionType) -> Tensor:
    """Inverse of `output_to_velocity` at a point: the output a model must give to have velocity v."""
    check_prediction_type(prediction_type)
    y, t = flow_of_vp(x_tau, alpha, sigma)
    x0, eps = split_velocity(y, v, t)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return expand_time(alpha, x_tau) * eps - expand_time(sigma, x_tau) * x0
    return v


def output_gain(alpha: Tensor, sigma: Tensor, prediction_type: PredictionType) -> Tensor:
    """A(t) in v = A(t) * output + B(t) * x_tau: how much an output error moves the velocity
    ((alpha + sigma) / alpha for eps, alpha + sigma for v, 1 for flow)."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return (alpha + sigma) / alpha
    if prediction_type == "v_prediction":
        return alpha + sigma
    return torch.ones_like(alpha)


@dataclass(frozen=True)
class NoiseEntry:
    """Where a field's pure noise enters the time axis: noise eps is the state `scale * eps` at time `t`.

    For a straight flow that is eps at t = 1. A VP teacher never reaches t = 1: SD1.5's noisiest timestep
    has alpha_bar = 0.0047, flow time t_max = 0.936, and SD was trained, and every diffusers sampler starts,
    with x_999 = eps, i.e. y = eps / (alpha + sigma) at t_max (docs/design.md §1). Samplers and pair makers
    start there, so one Euler step of a VP field is one DDIM step from the very first step on.
    """

    t: float = 1.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not (0.0 < self.t <= 1.0) or not self.scale > 0:
            raise ProReflowError(f"a noise entry needs 0 < t <= 1 and scale > 0, got t={self.t}, scale={self.scale}")

    @property
    def is_default(self) -> bool:
        return self.t == 1.0 and self.scale == 1.0


#: a straight flow's pure noise: eps at t = 1
PURE_NOISE = NoiseEntry()


@runtime_checkable
class Teacher(Protocol):
    """A velocity field as the algorithm sees it (pairs, samplers, metrics): v(x, t, cond) in our convention,
    where its pure noise enters (`NoiseEntry`), and a digest of its frozen weights (None for analytic fields), so
    that a pair cache made by other weights is never reused. The fields of `proreflow.fields` implement it;
    `as_teacher` adapts anything else."""

    @property
    def noise_entry(self) -> NoiseEntry: ...

    def fingerprint(self) -> str | None: ...

    def __call__(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor: ...


class ModuleField:
    """Mixin for velocity fields that are `nn.Module`s: pure noise at t = 1 (a VP adapter overrides it) and the
    digest of the module's own frozen weights, with the guidance scale when it is not 1 (the same weights at
    another scale are another teacher; at 1 the digest is the weights' alone, as pair caches made before knew it)."""

    noise_entry: NoiseEntry = PURE_NOISE
    guidance_scale: float = 1.0  # the classifier-free guidance the field applies; fields that guide set their own

    def guidance(self) -> float:
        """The classifier-free guidance scale the field applies (1: none)."""
        return self.guidance_scale

    def fingerprint(self) -> str | None:
        from proreflow.store import module_digest

        digest = module_digest(self, "frozen")[:16]  # type: ignore[arg-type]
        scale = self.guidance()
        return digest if scale == 1.0 else f"{digest}-guidance{scale:g}"


class CallableTeacher:
    """A plain `fn(x, t, cond) -> v` (a function, or a network that is not a field of ours) as a `Teacher`: pure
    noise at t = 1, fingerprinted by its weights when it is a `torch.nn.Module`, else None."""

    noise_entry = PURE_NOISE

    def __init__(self, fn: Callable[..., Tensor]) -> None:
        self.fn = fn

    def fingerprint(self) -> str | None:
        if not isinstance(self.fn, torch.nn.Module):
            return None
        from proreflow.store import module_digest

        return module_digest(self.fn, "frozen")[:16]

    def __call__(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return self.fn(x, t, cond)


def as_teacher(field: Any) -> Teacher:
    """`field` itself when it is a `Teacher`, else wrapped as one (`CallableTeacher`)."""
    if isinstance(field, Teacher):
        return field
    if not callable(field):
        raise ProReflowError(f"a velocity field must be callable as field(x, t, cond), got {type(field).__name__}")
    return CallableTeacher(field)


def noise_entry(field: Any) -> NoiseEntry:
    """Where a velocity field's pure noise enters (VP adapters declare theirs), else pure noise at t = 1."""
    return as_teacher(field).noise_entry
