"""Quality and cost measures (docs/design.md §4).

- teacher fidelity: RMSE between a k-step output and the teacher's finely solved ODE output
  from the same noise (0 is the physical limit);
- distribution distance to held-out data: sliced Wasserstein-2 and energy distance;
- straightness (Liu et al. 2022): mean squared deviation of the velocity from its window's chord.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from proreflow.conventions import chord_velocity, noise_entry
from proreflow.errors import ProReflowError
from proreflow.solvers import VelocityField, solve
from proreflow.windows import WindowSchedule


def fidelity_rmse(output: Tensor, reference: Tensor) -> float:
    """Root mean squared difference over all elements of two outputs from the same noise."""
    if output.shape != reference.shape:
        raise ProReflowError(f"fidelity needs equal shapes, got {tuple(output.shape)} and {tuple(reference.shape)}")
    return float(torch.sqrt(torch.mean((output.double() - reference.double()) ** 2)))


def sliced_wasserstein(a: Tensor, b: Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance between point sets (compared through 512 quantiles per direction)."""
    a, b = a.double().reshape(a.shape[0], -1), b.double().reshape(b.shape[0], -1)
    if a.shape[1] != b.shape[1]:
        raise ProReflowError(f"point sets differ in dimension: {a.shape[1]} vs {b.shape[1]}")
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], projections, generator=gen, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    q = torch.linspace(0.0, 1.0, 512, dtype=torch.float64)
    qa = torch.quantile(a @ dirs, q, dim=0)
    qb = torch.quantile(b @ dirs, q, dim=0)
    return float(torch.sqrt(torch.mean((qa - qb) ** 2)))


def energy_distance(a: Tensor, b: Tensor) -> float:
    """Energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| (unbiased within-set terms), 0 iff equal laws."""
    a, b = a.double().reshape(a.shape[0], -1), b.double().reshape(b.shape[0], -1)
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ProReflowError("energy distance needs at least 2 points in each set")
    ab = torch.cdist(a, b).mean()
    aa = torch.cdist(a, a).sum() / (a.shape[0] * (a.shape[0] - 1))
    bb = torch.cdist(b, b).sum() / (b.shape[0] * (b.shape[0] - 1))
    return float(2 * ab - aa - bb)


@torch.no_grad()
def straightness(field: VelocityField, noise: Tensor, schedule: WindowSchedule, substeps: int = 16,
                 cond: Any = None) -> float:
    """Liu et al.'s straightness of `field` per window, length-weighted over the schedule.

    Inside each window the trajectory is integrated finely (Euler, `substeps`); the deviation
    of the velocity at every sub-step from the window chord (x_a - x_b) / (t_a - t_b) is squared
    and averaged per element. 0 means every window is traversed on a straight line at constant speed.
    """
    entry = noise_entry(field)  # where pure noise enters (t_max for a VP teacher)
    x, total = noise * entry.scale, 0.0
    b = schedule.entered_at(entry.t)
    for t_a, t_b in zip(b[:-1], b[1:]):
        traj = solve(field, x, t_a, t_b, substeps, "euler", cond, return_trajectory=True)
        chord = chord_velocity(traj[0], traj[-1], t_a, t_b)
        h = (t_b - t_a) / substeps
        # Euler: the velocity used at sub-step i is exactly (x_{i+1} - x_i) / h, no re-evaluation
        dev = sum(float(torch.mean(((x1 - x0) / h - chord) ** 2)) for x0, x1 in zip(traj[:-1], traj[1:]))
        total += (t_a - t_b) * dev / substeps
        x = traj[-1]
    return total


class FrechetDistance:
    """Fréchet distance to a fixed real set in the feature space of `feature` (an nn.Module with a
    `num_features` attribute): the statistics and the distance of `metrics_images` (torchmetrics' FID
    with that custom feature module), which `proreflow evaluate` uses for FID too.

    The real statistics are computed once; each call compares one generated set against them.
    """

    def __init__(self, feature: torch.nn.Module, real: Tensor, batch_size: int = 500) -> None:
        try:
            import torchmetrics  # noqa: F401
        except ImportError:
            raise ProReflowError("Fréchet distances need torchmetrics: pip install 'proreflow[metrics]'") from None
        from proreflow.metrics_images import image_stats

        if real.shape[0] < 2:
            raise ProReflowError(f"the real set needs at least 2 images, got {real.shape[0]}")
        self.feature, self.batch_size = feature, batch_size
        self.shape = tuple(real.shape[1:])
        self.real = image_stats(feature, self._batches(real))

    def _batches(self, images: Tensor) -> list[Tensor]:
        return [images[i:i + self.batch_size].float() for i in range(0, images.shape[0], self.batch_size)]

    @torch.no_grad()
    def __call__(self, fake: Tensor) -> float:
        from proreflow.metrics_images import frechet_distance, image_stats

        if tuple(fake.shape[1:]) != self.shape or fake.shape[0] < 2:
            raise ProReflowError(f"generated images must be N >= 2 of shape {self.shape}, got {tuple(fake.shape)}")
        return frechet_distance(self.real, image_stats(self.feature, self._batches(fake)))
