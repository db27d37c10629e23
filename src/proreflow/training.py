"""The stage loop: one training loop for flow matching (1-rectified flow) and every reflow stage.

Built on accelerate from day one (device placement, DDP, gradient accumulation, mixed
precision); the algorithm (what a batch is) comes in through a `BatchFn`, so the loop never
knows whether it trains a teacher, a PeRFlow baseline or a progressive ProReflow stage.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from proreflow.errors import ProReflowError
from proreflow.losses import aligned_loss
from proreflow.pairs import TeacherSolver, make_window_pairs
from proreflow.solvers import VelocityField
from proreflow.windows import ProgressivePlan


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by every stage (the budget itself lives in the plan)."""

    lr: float = 1e-3
    batch_size: int = 256
    ema_decay: float = 0.999
    grad_accum: int = 1
    grad_clip: float | None = 1.0
    weight_decay: float = 0.0
    warmup_steps: int = 0
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16" (accelerate)
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number, got {self.lr}"),
            (isinstance(self.batch_size, int) and self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (0.0 <= self.ema_decay < 1.0, f"ema_decay must be in [0, 1), got {self.ema_decay}"),
            (isinstance(self.grad_accum, int) and self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be positive or null, got {self.grad_clip}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (self.mixed_precision in ("no", "fp16", "bf16"), f"mixed_precision must be no/fp16/bf16, got {self.mixed_precision!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ProReflowError(msg)


@dataclass
class TrainBatch:
    """What one micro-step trains on: inputs (x, t, cond), the velocity target and its teacher cost."""

    x: Tensor
    t: Tensor
    target: Tensor
    cond: Any = None
    teacher_nfe: int = 0


#: (micro-step index, generator) -> batch
BatchFn = Callable[[int, torch.Generator], TrainBatch]


@dataclass
class FitResult:
    model: nn.Module  # the EMA weights (what is evaluated and handed to the next stage)
    losses: list[float] = field(default_factory=list)
    directions: list[float] = field(default_factory=list)
    teacher_nfe: int = 0
    pairs: int = 0

    @property
    def nfe_per_pair(self) -> float:
        return self.teacher_nfe / self.pairs if self.pairs else 0.0


def ema_with_warmup(decay: float) -> Callable:
    """EMA update whose decay ramps up as min(decay, (1 + n) / (10 + n)) like diffusers' EMAModel,
    so short stages are not dominated by their initial weights."""

    @torch.no_grad()
    def update(ema_params: list[Tensor], params: list[Tensor], num_averaged: Tensor) -> None:
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        torch._foreach_lerp_(ema_params, params, 1.0 - d)

    return update


def make_accelerator(cfg: TrainConfig, cpu: bool | None = None) -> Accelerator:
    """An Accelerator for `cfg`; on a machine without CUDA it runs on CPU."""
    if cpu is None:
        cpu = not torch.cuda.is_available()
    return Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=cfg.mixed_precision, cpu=cpu)


def fit(model: nn.Module, batch_fn: BatchFn, steps: int, cfg: TrainConfig, lam: float = 0.0,
        accelerator: Accelerator | None = None, desc: str = "train", seed_offset: int = 0) -> FitResult:
    """Train `model` for `steps` optimizer steps on batches from `batch_fn`; returns EMA weights.

    `model` itself is not modified: training runs on a copy, so a stage can start from a
    shared initial network without disturbing it.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ProReflowError(f"training steps must be a positive integer, got {steps!r}")
    acc = accelerator or make_accelerator(cfg)
    net = copy.deepcopy(model).train().requires_grad_(True)
    ema = AveragedModel(net, multi_avg_fn=ema_with_warmup(cfg.ema_decay), use_buffers=True)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0)
    net, opt, sched = acc.prepare(net, opt, sched)
    ema.to(acc.device)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + seed_offset * 7919 + acc.process_index)
    result = FitResult(model=model)
    bar = tqdm(total=steps, desc=desc, disable=not (cfg.progress and acc.is_main_process), leave=False, dynamic_ncols=True)
    done, micro = 0, 0
    while done < steps:
        batch = batch_fn(micro, gen)
        micro += 1
        with acc.accumulate(net):
            with acc.autocast():
                pred = net(batch.x.to(acc.device), batch.t.to(acc.device), _to(batch.cond, acc.device))
            terms = aligned_loss(pred, batch.target.to(acc.device), lam)
            if not torch.isfinite(terms.total):
                raise ProReflowError(
                    f"{desc}: non-finite loss at step {done} (lr={cfg.lr}); lower the learning rate or check the data"
                )
            acc.backward(terms.total)
            if acc.sync_gradients and cfg.grad_clip:
                acc.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        result.teacher_nfe += batch.teacher_nfe
        result.pairs += batch.x.shape[0] if batch.teacher_nfe else 0
        if acc.sync_gradients:
            ema.update_parameters(acc.unwrap_model(net))
            done += 1
            result.losses.append(float(terms.total.detach()))
            result.directions.append(float(terms.direction.detach()))
            bar.update(1)
            if done % 50 == 0 or done == steps:
                bar.set_postfix(loss=f"{result.losses[-1]:.4f}", cos=f"{1 - result.directions[-1]:.4f}")
    bar.close()
    result.model = ema.module.eval()
    return result


def _to(cond: Any, device: torch.device) -> Any:
    if isinstance(cond, Tensor):
        return cond.to(device)
    if isinstance(cond, dict):
        return {k: _to(v, device) for k, v in cond.items()}
    return cond


#: (n, generator) -> (real data x0, conditioning or None)
DataFn = Callable[[int, torch.Generator], tuple[Tensor, Any]]


def flow_matching_batches(data_fn: DataFn, batch_size: int, exact_velocity: VelocityField | None = None) -> BatchFn:
    """1-rectified flow: x_t on the straight path at t ~ U(0, 1), target eps - x0.

    With `exact_velocity` (an analytic teacher), the target is the exact marginal velocity at
    x_t instead, which has no sampling variance.
    """
    from proreflow.conventions import interpolate, path_velocity

    def batch(_: int, gen: torch.Generator) -> TrainBatch:
        x0, cond = data_fn(batch_size, gen)
        eps = torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
        t = torch.rand(x0.shape[0], generator=gen, dtype=x0.dtype)
        x_t = interpolate(x0, eps, t)
        target = exact_velocity(x_t, t, cond) if exact_velocity is not None else path_velocity(x0, eps)
        return TrainBatch(x_t, t, target.to(x0.dtype), cond)

    return batch


def reflow_batches(teacher: VelocityField, data_fn: DataFn, schedule, solver: TeacherSolver,
                   batch_size: int, margin: float = 0.0) -> BatchFn:
    """Windowed reflow: fresh teacher pairs for `schedule` each micro-step, a random point on each chord.

    Points are drawn at t = t_a - u (t_a - t_b) with u ~ U[0, 1 - margin). The one-step sampler
    queries each window at its start t_a, where the previous window ends; a network that is
    smooth in t cannot jump between the two chords at a single instant, so leaving the last
    `margin` of every window untrained gives it room to switch before the next window starts.
    """
    if not 0.0 <= margin < 1.0:
        raise ProReflowError(f"window margin must be in [0, 1), got {margin}")

    def batch(_: int, gen: torch.Generator) -> TrainBatch:
        x0, cond = data_fn(batch_size, gen)
        pairs = make_window_pairs(teacher, x0, schedule, solver, generator=gen, cond=cond)
        u = torch.rand(x0.shape[0], generator=gen, dtype=x0.dtype) * (1.0 - margin)
        x_t, t = pairs.point(u)
        return TrainBatch(x_t, t, pairs.target(), cond, pairs.teacher_nfe)

    return batch


@dataclass
class PlanResult:
    student: nn.Module
    stages: list[FitResult]

    @property
    def teacher_nfe(self) -> int:
        return sum(s.teacher_nfe for s in self.stages)

    @property
    def nfe_per_pair(self) -> float:
        pairs = sum(s.pairs for s in self.stages)
        return self.teacher_nfe / pairs if pairs else 0.0

    @property
    def optimizer_steps(self) -> int:
        return sum(len(s.losses) for s in self.stages)


def train_plan(init: nn.Module, teacher: VelocityField, data_fn: DataFn, plan: ProgressivePlan,
               solver: TeacherSolver, cfg: TrainConfig, lam: float, accelerator: Accelerator | None = None,
               desc: str = "reflow", margin: float = 0.0) -> PlanResult:
    """Run a progressive plan: stage k+1 starts from stage k's (EMA) student, the first from `init`.

    The teacher stays fixed across stages: each stage's pairs come from the teacher's ODE over
    that stage's (wider) windows, as in the paper.
    """
    acc = accelerator or make_accelerator(cfg)
    student, stages = init, []
    for k, stage in enumerate(plan.stages):
        batches = reflow_batches(teacher, data_fn, stage.schedule, solver, cfg.batch_size, margin)
        res = fit(student, batches, stage.steps, cfg, lam=lam, accelerator=acc,
                  desc=f"{desc} stage {k + 1}/{len(plan.stages)} (K={stage.schedule.num_windows})", seed_offset=k + 1)
        stages.append(res)
        student = res.model
    return PlanResult(student=student, stages=stages)
