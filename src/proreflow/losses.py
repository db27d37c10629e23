"""Velocity losses: plain MSE (reflow) and aligned v-prediction (MSE + lambda * (1 - cos)).

The direction term is a per-sample cosine over all of a sample's dimensions, because the
paper's observation is that the velocity's direction matters more for few-step quality than
its magnitude; lambda = 0 recovers plain reflow exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from proreflow.errors import ProReflowError


def mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over every element."""
    return torch.mean((pred.float() - target.float()) ** 2)


def cosine_per_sample(pred: Tensor, target: Tensor, eps: float = 1e-8) -> Tensor:
    """Cosine similarity of each sample's flattened prediction and target, shape (B,)."""
    p = pred.float().reshape(pred.shape[0], -1)
    q = target.float().reshape(target.shape[0], -1)
    return torch.nn.functional.cosine_similarity(p, q, dim=1, eps=eps)


def check_lambda(lam: object, what: str = "direction weight lambda") -> float:
    """`lam` as a float, or a clear error: the direction weight is a finite number >= 0 (NaN, infinities, bools and
    strings are refused). The one check behind methods, `aligned` and `aligned_loss`."""
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise ProReflowError(f"{what} must be a finite number >= 0, got {lam!r}")
    return float(lam)


@dataclass(frozen=True)
class LossTerms:
    total: Tensor
    mse: Tensor
    direction: Tensor  # mean of (1 - cos), reported even when lambda = 0


def aligned_loss(pred: Tensor, target: Tensor, lam: float, weight: Tensor | None = None) -> LossTerms:
    """MSE(pred, target) + lam * mean(1 - cos(pred, target)) (aligned v-prediction).

    `weight` (B,) optionally weights each sample's squared error (normalised by its mean), e.g. to
    measure a VP student's error in its own output space; the direction term is scale-free and
    stays unweighted.
    """
    if pred.shape != target.shape:
        raise ProReflowError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    check_lambda(lam)
    if weight is None:
        m = mse(pred, target)
    else:
        per = ((pred.float() - target.float()) ** 2).reshape(pred.shape[0], -1).mean(1)
        w = weight.float().to(per.device)
        m = (w * per).sum() / w.sum().clamp_min(1e-12)
    d = torch.mean(1.0 - cosine_per_sample(pred, target))
    return LossTerms(total=m + lam * d if lam else m, mse=m, direction=d)


#: (prediction, target, per-sample weight or None) -> loss terms: what the training loop minimises
LossFn = Callable[[Tensor, Tensor, "Tensor | None"], LossTerms]


def aligned(lam: float, weighted: bool = True) -> LossFn:
    """`aligned_loss` with its direction weight fixed (lam = 0: plain reflow / flow matching MSE).
    weighted=False drops the per-sample weight a student offers (`loss_weighting: velocity`, the default): the MSE
    is then measured on the velocity itself, where a one-step-per-window sampler's error is made."""
    check_lambda(lam)
    return lambda pred, target, weight=None: aligned_loss(pred, target, lam, weight if weighted else None)
