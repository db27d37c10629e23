"""Figures for the demo: samples per method against held-out data, and trajectories."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from proreflow.sampling import sample  # noqa: E402
from proreflow.windows import WindowSchedule  # noqa: E402


def _save(fig: Any, path: Path) -> None:
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


def plot_samples(outputs: dict[tuple[str, int], Tensor], data: Tensor, steps: list[int], names: list[str],
                 path: Path) -> None:
    """Rows: step counts; columns: held-out data then each method (first two coordinates)."""
    cols = len(names) + 1
    fig, axes = plt.subplots(len(steps), cols, figsize=(2.3 * cols, 2.4 * len(steps)), squeeze=False)
    lim = float(data[:, :2].abs().max()) * 1.3
    for i, k in enumerate(steps):
        for j, name in enumerate(["held-out data", *names]):
            ax = axes[i][j]
            pts = data if j == 0 else outputs[(name, k)]
            ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4, color="k" if j == 0 else "C0")
            ax.set_xlim(-lim, lim), ax.set_ylim(-lim, lim)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(name if j == 0 else f"{name}\n{k} steps", fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def plot_trajectories(teacher: Any, fields: dict[tuple[str, int], tuple[Any, WindowSchedule, int]], noise: Tensor,
                      steps: list[int], names: list[str], path: Path, reference_steps: int = 64) -> None:
    """Teacher's fine ODE paths (grey) vs each method's few-step path (colour) from the same noises."""
    ref = torch.stack(sample(teacher, noise, WindowSchedule.uniform(1), reference_steps, method="rk4",
                             return_trajectory=True))
    cols = len(names)
    fig, axes = plt.subplots(len(steps), cols, figsize=(2.4 * cols, 2.4 * len(steps)), squeeze=False)
    for i, k in enumerate(steps):
        for j, name in enumerate(names):
            ax = axes[i][j]
            field_, sched, per_window = fields[(name, k)]
            traj = torch.stack(sample(field_, noise, sched, per_window, return_trajectory=True))
            ax.plot(ref[:, :, 0], ref[:, :, 1], color="0.7", lw=0.6)
            ax.plot(traj[:, :, 0], traj[:, :, 1], color="C3", lw=0.7, marker=".", ms=2)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"{name}\n{k} steps", fontsize=7)
    fig.tight_layout()
    _save(fig, path)
