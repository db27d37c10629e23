"""Figures: the toy demo (samples, trajectories) and the digits benchmark (image grids, figs. 1a, 1b, 3)."""

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


def plot_image_grid(panels: dict[str, Tensor], path: Path, cols: int = 10) -> None:
    """One row per panel (name -> images in [-1, 1], N x 1 x H x W), `cols` images each."""
    fig, axes = plt.subplots(len(panels), 1, figsize=(cols * 0.55, len(panels) * 0.75), squeeze=False)
    for ax, (name, imgs) in zip(axes[:, 0], panels.items()):
        imgs = imgs[:cols].clamp(-1, 1)
        strip = torch.cat(list(imgs[:, 0]), dim=1)
        ax.imshow(strip.numpy(), cmap="gray_r", vmin=-1, vmax=1)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def plot_discrepancy(times: Tensor, l2: Tensor, cos: Tensor, path: Path) -> None:
    """Fig. 1a: heat maps of RMS L2 distance and cosine similarity between velocities at two timesteps."""
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.6))
    ticks = [f"{float(t):.2f}" for t in times]
    for ax, mat, title, cmap in ((axes[0], l2, "RMS L2 distance", "magma"), (axes[1], cos, "cosine similarity", "viridis")):
        im = ax.imshow(mat.numpy(), cmap=cmap)
        step = max(1, len(ticks) // 8)
        ax.set_xticks(range(0, len(ticks), step), ticks[::step], rotation=90, fontsize=7)
        ax.set_yticks(range(0, len(ticks), step), ticks[::step], fontsize=7)
        ax.set_xlabel("t (1 = noise)"), ax.set_ylabel("t")
        ax.set_title(f"teacher velocity: {title}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    _save(fig, path)


def plot_perturbation(rows: list[dict], fd_clean: float, path: Path) -> None:
    """Fig. 1b: FD of perturbed teacher sampling vs relative perturbation norm, direction vs magnitude."""
    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    for kind, marker in (("direction", "o"), ("magnitude", "s")):
        sel = sorted((r for r in rows if r["perturbation"] == kind), key=lambda r: r["eps"])
        ax.plot([0.0] + [r["eps"] for r in sel], [fd_clean] + [r["fd"] for r in sel], marker=marker, label=f"{kind} only")
    ax.set_xlabel("relative perturbation ‖v'−v‖ / ‖v‖"), ax.set_ylabel("FD (classifier features)")
    ax.set_title("perturbing the teacher's velocity", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_guidance_sweep(groups: dict[str, list[dict]], metrics: list[tuple[str, str]], path: Path) -> None:
    """The paper's fig. 3: each metric (row key, axis label) against the guidance scale, one line per group
    (rows of a group differ in `guidance` only; rows whose metric is None are left out)."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.4), squeeze=False)
    for label, rows in groups.items():
        rows = sorted(rows, key=lambda r: r["guidance"])
        for ax, (key, _) in zip(axes[0], metrics):
            pts = [(r["guidance"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
    for ax, (_, ylabel) in zip(axes[0], metrics):
        ax.set_xlabel("guidance scale"), ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
