"""A progressive plan trained stage by stage: pairs (teacher or previous stage), batches, loss, fit."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from accelerate import Accelerator
from torch import Tensor, nn

from proreflow.errors import ProReflowError
from proreflow.pairs import CachedPairs, PairCache, PairMemo, TeacherSolver, grid_solver
from proreflow.store import json_key
from proreflow.sampling import sample
from proreflow.solvers import VelocityField
from proreflow.training.batches import DataFn, cached_reflow_batches, reflow_batches
from proreflow.training.checkpoint import CheckpointConfig
from proreflow.training.config import resolve_batch
from proreflow.accel import process_state
from proreflow.training.loop import FitResult, fit
from proreflow.training.monitor import Monitor
from proreflow.training.recipe import Recipe
from proreflow.training.signals import check_stop
from proreflow.windows import ProgressivePlan, WindowSchedule


@dataclass(frozen=True)
class PairCacheConfig:
    """Cache teacher pairs per stage under `dir` instead of generating them on the fly.

    `pairs` per stage; None: one pair per training sample of the stage (steps x global batch). A stage's
    cache is named by what its pairs depend on (windows, pair seed, count, shard size, solver, the weights that
    solve them), so every plan trained under one `dir` shares the pairs it has in common with another (PeRFlow
    and its aligned variant; ProReflow-I's stages and ProReflow-II's first two). `dir` itself must stand for
    the data the pairs start from: one `dir` per dataset and conditioning rule.
    """

    dir: Path
    pairs: int | None
    shard_size: int = 10_000


@dataclass
class PlanResult:
    """A trained plan: the student, every stage's fit, where each stage's pairs came from, and the plan itself
    (so the result can sample the way it was trained)."""

    student: nn.Module
    stages: list[FitResult]
    sources: list[str]  # per stage: what made its pairs, "teacher" or "previous_stage"
    plan: ProgressivePlan
    memo_pairs: tuple[int, int] = (0, 0)  # with `pair_memo`: pairs (loaded, solved) over all stages

    def sample(self, noise: Tensor, steps: int | None = None, cond: Any = None) -> Tensor:
        """The student's samples from `noise` in `steps` Euler steps (default: one per final window; any
        multiple of the window count)."""
        schedule = self.plan.final
        per_window = schedule.steps_per_window(schedule.num_windows if steps is None else steps)
        self.student.eval()
        return sample(self.student, noise, schedule, per_window, cond=cond)  # the module: it names its noise entry

    def _nfe(self, source: str) -> int:
        return sum(s.teacher_nfe for s, src in zip(self.stages, self.sources) if src == source)

    @property
    def teacher_nfe(self) -> int:
        """Teacher evaluations spent on pairs (stages whose pairs the teacher made)."""
        return self._nfe("teacher")

    @property
    def student_nfe(self) -> int:
        """Student evaluations spent on pairs (stages whose pairs the previous stage's student made)."""
        return self._nfe("previous_stage")

    @property
    def nfe_per_pair(self) -> float:
        """Teacher evaluations per training pair, over all stages."""
        pairs = sum(s.pairs for s in self.stages)
        return self.teacher_nfe / pairs if pairs else 0.0

    @property
    def student_nfe_per_pair(self) -> float:
        pairs = sum(s.pairs for s in self.stages)
        return self.student_nfe / pairs if pairs else 0.0

    @property
    def optimizer_steps(self) -> int:
        return sum(len(s.losses) for s in self.stages)


def train_plan(init: nn.Module, teacher: VelocityField, data_fn: DataFn, recipe: Recipe, k: int,
               accelerator: Accelerator | None = None, desc: str | None = None,
               checkpoints: CheckpointConfig | None = None, pair_cache: PairCacheConfig | None = None,
               copy_model: bool = True, on_step: Callable[[int, int, Callable[[], nn.Module], FitResult], None] | None = None,
               stages: tuple[int, int | None] = (0, None), monitor: Monitor | None = None,
               pair_memo: str | Path | None = None) -> PlanResult:
    """Train `recipe`'s k-step student: stage k+1 starts from stage k's (EMA) student, the first from `init`.

    Pair source "teacher": every stage's pairs come from the fixed teacher's ODE over that stage's (wider)
    windows. "previous_stage": stage k+1's pairs come from a frozen copy of stage k's student, one Euler step
    per stage-k window (the first stage still uses the teacher). The recipe's time sampling places the
    training points on each chord. `on_step(stage, done, ema_model_fn, result)` is `fit`'s callback with the
    0-based stage index in front.

    `stages=(a, b)` trains only `plan.stages[a:b]`, with `init` standing for stage a-1's student (a > 0). The
    result is bitwise what the whole plan gives at those stages (every stage draws from its own seed), so a
    budget sweep can take stage 1 of several budgets from one longer stage-1 run's EMA snapshots.
    `monitor` logs every stage on one step axis (`training.monitor`). `pair_memo`: a folder where fresh pairs
    are remembered by their inputs (`pairs.PairMemo`), so plans run under it solve the pairs they share once.
    """
    world = accelerator.num_processes if accelerator else process_state().num_processes
    plan, cfg, solver = recipe.plan(k), resolve_batch(recipe.train, world), recipe.teacher_solver
    pair_source, sampling, desc = recipe.method.pair_source, recipe.sampling, desc or f"{recipe.method.name} k={k}"
    first, stop = stages
    if not 0 <= first < (len(plan.stages) if stop is None else min(stop, len(plan.stages))):
        raise ProReflowError(f"stages {stages} select no stage of a {len(plan.stages)}-stage plan")
    student, fits, sources, memos = init, [], [], []
    for k, stage in list(enumerate(plan.stages))[first:stop]:  # k: the stage index from here on
        source, stage_solver, kind = teacher, solver, "teacher"
        if pair_source == "previous_stage" and k > 0:
            # a frozen copy: the next stage may train `student` in place (copy_model=False)
            source = copy.deepcopy(student).eval().requires_grad_(False)
            stage_solver, kind = grid_solver(plan.stages[k - 1].schedule, max_batch=solver.max_batch), "previous_stage"
        cached = None
        if pair_cache is not None:
            n_pairs = pair_cache.pairs or stage.steps * cfg.batch_size * cfg.grad_accum
            cached = _stage_cache(pair_cache, k + 1, n_pairs, source, data_fn, stage.schedule, stage_solver,
                                  cfg.seed + k + 1, cfg.progress)
            batches = cached_reflow_batches(cached, cfg.batch_size, sampling)
        else:
            memo = PairMemo(pair_memo, source, stage.schedule, stage_solver) if pair_memo is not None else None
            memos += [memo] if memo is not None else []
            batches = reflow_batches(source, data_fn, stage.schedule, stage_solver, cfg.batch_size, sampling, memo)
        if monitor is not None:
            monitor.at_stage(k, len(plan.stages), stage.schedule, sum(s.steps for s in plan.stages[:k]))
        res = fit(student, batches, stage.steps, cfg, loss=recipe.loss, accelerator=accelerator,
                  desc=f"{desc} stage {k + 1}/{len(plan.stages)} (K={stage.schedule.num_windows})", seed_offset=k + 1,
                  checkpoints=checkpoints.for_fit(f"stage-{k + 1}") if checkpoints else None, copy_model=copy_model,
                  on_step=(lambda d, m, r, k=k: on_step(k, d, m, r)) if on_step else None,
                  data_state=data_fn if hasattr(data_fn, "state_dict") else None,
                  warmup_done=sum(s.steps for s in plan.stages[:k]) if cfg.warmup_scope == "run" else 0,
                  monitor=monitor)
        if cached is not None:  # report the teacher cost of the cache, not of the (free) batches drawn from it
            res.teacher_nfe, res.pairs = cached.pairs.teacher_nfe, len(cached)
        fits.append(res)
        sources.append(kind)
        if monitor is not None:
            monitor.teacher_nfe = sum(f.teacher_nfe for f, src in zip(fits, sources) if src == "teacher")
        student = res.model
        del source
    return PlanResult(student=student, stages=fits, sources=sources, plan=plan,
                      memo_pairs=(sum(m.hits for m in memos), sum(m.misses for m in memos)))


def _stage_cache(cfg: PairCacheConfig, stage: int, n_pairs: int, teacher: VelocityField, data_fn: DataFn,
                 schedule: WindowSchedule, solver: TeacherSolver, seed: int, progress: bool) -> CachedPairs:
    """The main process builds (or repairs) the stage's cache; then every process loads it."""
    # named by what the pairs are, not by the plan: plans that need the same pairs (same windows, pair seed,
    # count, solver and source weights; e.g. 8 -> 4 -> 2 and 8 -> 4 at stage 1) build them once under one `dir`
    spec = PairCache.spec(schedule, solver, n_pairs, cfg.shard_size, seed, teacher)  # digests the teacher once
    cache = PairCache(Path(cfg.dir) / f"w{schedule.num_windows}-seed{seed}-{json_key(spec)}")
    state = process_state()
    # one process may stop between shards; with several, the others would wait for it at the barrier
    after_each = (lambda: check_stop(f"while caching the pairs of stage {stage}")) if state.num_processes == 1 else None
    if state.is_main_process:
        cache.ensure(teacher, data_fn, schedule, solver, n_pairs, cfg.shard_size, seed, progress, after_each, spec)
    state.wait_for_everyone()
    return cache.ensure(teacher, data_fn, schedule, solver, n_pairs, cfg.shard_size, seed, spec=spec)
