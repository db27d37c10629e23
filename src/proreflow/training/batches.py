"""Batch builders: where the method meets the loop (which points on which path, with which target)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from proreflow.cond import take
from proreflow.conventions import interpolate, path_velocity
from proreflow.errors import ProReflowError
from proreflow.pairs import CachedPairs, PairMemo, TeacherSolver, make_window_pairs
from proreflow.solvers import VelocityField
from proreflow.time_sampling import TimeSampling
from proreflow.training.loop import BatchFn, TrainBatch
from proreflow.windows import WindowSchedule

#: (n, generator) -> (real data x0, conditioning or None)
DataFn = Callable[[int, torch.Generator], tuple[Tensor, Any]]


def flow_matching_batches(data_fn: DataFn, batch_size: int, exact_velocity: VelocityField | None = None) -> BatchFn:
    """1-rectified flow: x_t on the straight path at t ~ U(0, 1), target eps - x0.

    With `exact_velocity` (an analytic teacher), the target is the exact marginal velocity at
    x_t instead, which has no sampling variance.
    """

    def batch(_: int, gen: torch.Generator, rows: slice = slice(None)) -> TrainBatch:
        x0, cond = data_fn(batch_size, gen)
        eps = torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
        t = torch.rand(x0.shape[0], generator=gen, dtype=x0.dtype)
        x0, cond, eps, t = x0[rows], take(cond, rows), eps[rows], t[rows]
        x_t = interpolate(x0, eps, t)
        target = exact_velocity(x_t, t, cond) if exact_velocity is not None else path_velocity(x0, eps)
        return TrainBatch(x_t, t, target.to(x0.dtype), cond)

    return batch


def ddpm_batches(data_fn: DataFn, batch_size: int, alphas_cumprod: Tensor) -> BatchFn:
    """DDPM's own objective, as SD was trained (diffusers' train_text_to_image.py): integer timesteps uniform in
    0..T-1, x = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps, target eps. Train the raw network through
    `fields.FlowVelocity(net, time_scale=1)`, whose time is then the timestep itself. A VP teacher trained this way
    has never seen our flow convention, so it stands for SD where a convention error would show (docs/design.md
    §1); one trained by `flow_matching_batches` through `VPVelocity` learns whatever convention we feed it."""
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)

    def batch(_: int, gen: torch.Generator, rows: slice = slice(None)) -> TrainBatch:
        x0, cond = data_fn(batch_size, gen)
        eps = torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
        ts = torch.randint(0, ac.numel(), (x0.shape[0],), generator=gen)
        x0, cond, eps, ts = x0[rows], take(cond, rows), eps[rows], ts[rows]
        a = ac[ts].sqrt().to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
        s = (1 - ac[ts]).sqrt().to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
        return TrainBatch(a * x0 + s * eps, ts.to(x0.dtype), eps, cond)

    return batch


def reflow_batches(teacher: VelocityField, data_fn: DataFn, schedule: WindowSchedule, solver: TeacherSolver,
                   batch_size: int, sampling: TimeSampling = TimeSampling(), memo: PairMemo | None = None) -> BatchFn:
    """Windowed reflow: fresh teacher pairs for `schedule` each micro-step, a point on each chord.

    Points are drawn at t = t_a - u (t_a - t_b) with u from `sampling` (see `proreflow.time_sampling`:
    the one-step sampler queries each window only at its start). All randomness is drawn for the
    global batch; the teacher only solves this process's rows. With `memo` (a `PairMemo` of this teacher,
    schedule and solver), pairs solved before from the same inputs are loaded instead (the same tensors); the
    memo solves the others, so one of another teacher, schedule or solver is refused.
    """
    if memo is not None and (memo.teacher is not teacher or memo.schedule != schedule or memo.solver != solver):
        raise ProReflowError("reflow_batches: the pair memo was made for another teacher, window schedule or solver; "
                             "make it with the ones given here")

    def batch(_: int, gen: torch.Generator, rows: slice = slice(None)) -> TrainBatch:
        x0, cond = data_fn(batch_size, gen)
        noise = torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
        windows = schedule.sample_windows(x0.shape[0], gen)
        u = sampling.draw(x0.shape[0], gen, x0.dtype)
        x0, cond, noise, windows, u = x0[rows], take(cond, rows), noise[rows], windows[rows], u[rows]
        if memo is not None:  # loads what it holds, solves the rest with this very teacher
            pairs = memo(x0, cond, windows, noise)
        else:
            pairs = make_window_pairs(teacher, x0, schedule, solver, cond=cond, windows=windows, noise=noise)
        x_t, t = pairs.point(u)
        return TrainBatch(x_t, t, pairs.target(), cond, pairs.teacher_nfe)

    return batch


def cached_reflow_batches(cache: CachedPairs, batch_size: int, sampling: TimeSampling = TimeSampling()) -> BatchFn:
    """Like `reflow_batches`, but drawing pairs from a disk cache (teacher cost paid up front)."""

    def batch(_: int, gen: torch.Generator, rows: slice = slice(None)) -> TrainBatch:
        idx = torch.randint(0, len(cache), (batch_size,), generator=gen)
        u = sampling.draw(batch_size, gen, cache.pairs.x_a.dtype)
        pairs = cache.batch(idx[rows])
        x_t, t = pairs.point(u[rows])
        return TrainBatch(x_t, t, pairs.target(), pairs.cond, 0)

    return batch
