"""Gaussian-mixture data with the closed-form velocity of the straight path.

For x0 ~ sum_k pi_k N(mu_k, diag(s_k^2)) and x_t = (1 - t) x0 + t eps, each component gives
x_t | k ~ N((1 - t) mu_k, diag((1 - t)^2 s_k^2 + t^2)); with posterior weights w_k(x_t),
E[eps - x0 | x_t] = sum_k w_k (E[eps | x_t, k] - E[x0 | x_t, k]). Its ODE carries noise exactly
onto the mixture, so it is both a teacher and an oracle for tests and fidelity metrics.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from proreflow.conventions import PURE_NOISE
from proreflow.errors import ProReflowError


class GaussianMixture:
    """Mixture with diagonal (or isotropic) components in any dimension."""

    def __init__(self, means: Tensor, stds: Tensor | float, weights: Tensor | None = None) -> None:
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2 or means.shape[0] < 1 or means.shape[1] < 1:
            raise ProReflowError(f"GMM means must have shape (components, dim), got {tuple(means.shape)}")
        k, d = means.shape
        stds = torch.as_tensor(stds, dtype=torch.float64)
        stds = stds.expand(k, d) if stds.ndim == 0 else (stds[:, None].expand(k, d) if stds.ndim == 1 else stds)
        if stds.shape != (k, d) or not torch.all(stds > 0):
            raise ProReflowError("GMM stds must be positive, shape (components,), (components, dim) or scalar")
        w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (k,) or not torch.all(w > 0):
            raise ProReflowError(f"GMM weights must be {k} positive numbers, got {w.tolist()}")
        self.means, self.stds, self.weights = means, stds.clone(), w / w.sum()

    @classmethod
    def ring(cls, n_modes: int = 8, radius: float = 3.0, std: float = 0.3, dim: int = 2) -> "GaussianMixture":
        """Modes equally spaced on a circle in the first two coordinates (other coordinates 0)."""
        if dim < 2:
            raise ProReflowError(f"a ring mixture needs dim >= 2, got {dim}")
        ang = torch.arange(n_modes, dtype=torch.float64) * (2 * math.pi / n_modes)
        means = torch.zeros(n_modes, dim, dtype=torch.float64)
        means[:, 0], means[:, 1] = radius * torch.cos(ang), radius * torch.sin(ang)
        return cls(means, std)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None, return_labels: bool = False):
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[comp] + self.stds[comp] * z
        return (x, comp) if return_labels else x

    def mean(self) -> Tensor:
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        mu = self.mean()
        second = torch.einsum("k,kd,ke->de", self.weights, self.means, self.means) + torch.diag(self.weights @ self.stds**2)
        return second - torch.outer(mu, mu)

    def posterior(self, x_t: Tensor, t: Tensor) -> Tensor:
        """Component responsibilities w_k(x_t) at time t, shape (B, K)."""
        return self._terms(x_t, t)[0]

    def _terms(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Responsibilities (B, K), offsets x_t - (1 - t) mu_k and variances (B, K, D)."""
        mu, var = self._marginal(x_t, t)
        diff = x_t[:, None, :] - mu
        logp = -0.5 * ((diff**2) / var + torch.log(2 * math.pi * var)).sum(-1) + torch.log(self.weights.to(x_t))
        return torch.softmax(logp, dim=1), diff, var

    def _marginal(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        tt = t.to(x_t)[:, None, None]
        mu = (1 - tt) * self.means.to(x_t)[None]  # (B, K, D)
        var = (1 - tt) ** 2 * self.stds.to(x_t)[None] ** 2 + tt**2
        return mu, var

    def velocity(self, x_t: Tensor, t: Tensor | float, cond: Any = None) -> Tensor:
        """Exact E[eps - x0 | x_t] of the straight path, batched over x_t (B, D) and t (B,) or scalar."""
        if x_t.ndim != 2 or x_t.shape[1] != self.dim:
            raise ProReflowError(f"GMM velocity expects points of shape (B, {self.dim}), got {tuple(x_t.shape)}")
        t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device)
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        w, diff, var = self._terms(x_t, t)
        tt = t[:, None, None]
        s2 = self.stds.to(x_t)[None] ** 2
        e_eps = tt / var * diff
        e_x0 = self.means.to(x_t)[None] + (1 - tt) * s2 / var * diff
        return torch.einsum("bk,bkd->bd", w, e_eps - e_x0)

    __call__ = velocity


class ExactTeacher:
    """A mixture's exact velocity as a `conventions.Teacher`, evaluated in `dtype` (float64: the oracle's own
    rounding stays far below any student's error) and returned in the caller's dtype."""

    noise_entry = PURE_NOISE

    def __init__(self, gmm: GaussianMixture, dtype: torch.dtype = torch.float64) -> None:
        self.gmm, self.dtype = gmm, dtype

    def fingerprint(self) -> str | None:
        return None  # analytic: no weights

    def __call__(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return self.gmm.velocity(x.to(self.dtype), t.to(self.dtype)).to(x.dtype)
