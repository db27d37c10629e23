"""The stage loop: one training loop for flow matching (1-rectified flow) and every reflow stage.

Built on accelerate from day one (device placement, DDP, gradient accumulation, mixed
precision); the algorithm (what a batch is) comes in through a `BatchFn`, so the loop never
knows whether it trains a teacher, a PeRFlow baseline or a progressive ProReflow stage.
"""

from __future__ import annotations

import copy
import math
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch
from accelerate import Accelerator, PartialState
from torch import Tensor, nn
from tqdm.auto import tqdm

from proreflow.checkpoint import CheckpointConfig, FitCheckpoints, optimizer_from_flat, optimizer_to_flat, rng_state, set_rng_state
from proreflow.errors import ProReflowError
from proreflow.losses import LossFn, aligned
from proreflow.conventions import interpolate, path_velocity
from proreflow.methods import PAIR_SOURCES, PairSource
from proreflow.pairs import CachedPairs, PairCache, TeacherSolver, grid_solver, make_window_pairs, map_cond
from proreflow.solvers import VelocityField
from proreflow.time_sampling import TimeSampling
from proreflow.windows import ProgressivePlan, WindowSchedule


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
    on_nonfinite: Literal["stop", "skip"] = "stop"  # skip: drop the step and count it, up to max_skips
    max_skips: int = 10
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"  # adamw8bit: bitsandbytes' 8-bit AdamW (CUDA)
    channels_last: bool = False  # NHWC weights for conv UNets: faster convolutions on GPUs in bf16/fp16
    compile: bool = False  # torch.compile (inductor) through accelerate; off: no gain measured on CPU

    def __post_init__(self) -> None:
        checks = [
            (self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number, got {self.lr}"),
            (isinstance(self.batch_size, int) and self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (0.0 <= self.ema_decay < 1.0, f"ema_decay must be in [0, 1), got {self.ema_decay}"),
            (isinstance(self.grad_accum, int) and self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be positive or null, got {self.grad_clip}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (self.mixed_precision in ("no", "fp16", "bf16"), f"mixed_precision must be no/fp16/bf16, got {self.mixed_precision!r}"),
            (self.on_nonfinite in ("stop", "skip"), f"on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}"),
            (self.max_skips >= 0, f"max_skips must be >= 0, got {self.max_skips}"),
            (self.optimizer in ("adamw", "adamw8bit"), f"optimizer must be 'adamw' or 'adamw8bit', got {self.optimizer!r}"),
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


#: (micro-step index, generator, this process's rows of the global batch) -> batch.
#: The generator is identical on every process; each process keeps only its rows, so a run
#: on N processes sees exactly the global batch that one process would.
BatchFn = Callable[[int, torch.Generator, slice], TrainBatch]


@dataclass
class FitResult:
    model: nn.Module  # the EMA weights (what is evaluated and handed to the next stage)
    losses: list[float] = field(default_factory=list)
    directions: list[float] = field(default_factory=list)
    teacher_nfe: int = 0
    pairs: int = 0
    skipped: int = 0

    @property
    def nfe_per_pair(self) -> float:
        return self.teacher_nfe / self.pairs if self.pairs else 0.0

    def summary(self) -> dict[str, Any]:
        return {"losses": self.losses, "directions": self.directions, "teacher_nfe": self.teacher_nfe,
                "pairs": self.pairs, "skipped": self.skipped}


#: (optimizer steps done in this fit, a function returning a copy of the EMA model, the fit's running
#: result) -> None; the copy is made only when the callback asks for it
StepCallback = Callable[[int, Callable[[], nn.Module], "FitResult"], None]


class TrainingInterrupted(Exception):
    """SIGTERM arrived; the run saved a checkpoint (when checkpointing) and stopped cleanly."""


class _StopFlag:
    requested = False


def check_stop(where: str) -> None:
    """Stop at a safe point outside `fit`'s steps (between pair-cache shards, between a benchmark's
    runs) when a SIGTERM arrived inside `stop_on_sigterm`; what finished is already on disk."""
    if _StopFlag.requested:
        raise TrainingInterrupted(f"stopped by SIGTERM {where}; finished work is on disk and is reused on rerun")


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into a request to checkpoint and stop after the current optimizer step."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _StopFlag.requested = False
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: setattr(_StopFlag, "requested", True))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _StopFlag.requested = False


def ema_with_warmup(decay: float) -> Callable:
    """EMA update whose decay ramps up as min(decay, (1 + n) / (10 + n)) like diffusers' EMAModel,
    so short stages are not dominated by their initial weights."""

    @torch.no_grad()
    def update(ema_params: list[Tensor], params: list[Tensor], num_averaged: Tensor) -> None:
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        torch._foreach_lerp_(ema_params, params, 1.0 - d)

    return update


class TrainableEMA:
    """EMA of a model's trainable parameters only (looked up by name, so wrappers may replace them).

    With LoRA on a frozen UNet this holds adapter-sized copies instead of a second UNet. The first
    update copies the weights; later ones lerp with `ema_with_warmup`'s decay. Frozen parameters
    and buffers need no average: `copy_to` writes the averages into the live model's trainable
    parameters, and everything else is the model's own.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.shadow = [p.detach().clone() for _, p in named]
        self.n_averaged = 0
        self._update = ema_with_warmup(decay)

    def _params(self, model: nn.Module) -> list[Tensor]:
        params = dict(model.named_parameters())
        return [params[n] for n in self.names]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = [p.detach() for p in self._params(model)]
        if self.n_averaged == 0:
            torch._foreach_copy_(self.shadow, current)
        else:
            self._update(self.shadow, current, torch.tensor(self.n_averaged))
        self.n_averaged += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for p, s in zip(self._params(model), self.shadow):
            p.copy_(s)

    def to(self, device: torch.device | str) -> "TrainableEMA":
        self.shadow = [s.to(device) for s in self.shadow]
        return self

    def numel(self) -> int:
        return sum(s.numel() for s in self.shadow)

    def state_dict(self) -> dict[str, Tensor]:
        return {"n_averaged": torch.tensor(self.n_averaged), **dict(zip(self.names, self.shadow))}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if set(state) != {"n_averaged", *self.names}:
            raise KeyError("EMA tensors do not match this model's trainable parameters")
        self.shadow = [state[n].to(s.device, s.dtype).clone() for n, s in zip(self.names, self.shadow)]
        self.n_averaged = int(state["n_averaged"])


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW (optimizer states in 8 bits: 2 bytes per parameter
    instead of 8, what makes full SDXL fine-tuning fit on 80 GB); bitsandbytes is imported only here."""
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ProReflowError("optimizer adamw8bit needs bitsandbytes and a CUDA GPU: pip install bitsandbytes, "
                                 "or set train.optimizer: adamw") from None
        return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def process_state() -> PartialState:
    """accelerate's process state, initialised the way `make_accelerator` needs it.

    The first PartialState of a process fixes its distributed type for good; on a machine
    without CUDA it must be created with cpu=True, or `accelerate launch` with 2 processes
    gives two independent single-process runs instead of MULTI_CPU (gloo).
    """
    return PartialState(cpu=not torch.cuda.is_available())


def make_accelerator(cfg: TrainConfig, cpu: bool | None = None) -> Accelerator:
    """An Accelerator for `cfg`; on a machine without CUDA it runs on CPU."""
    if cpu is None:
        cpu = not torch.cuda.is_available()
    return Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=cfg.mixed_precision, cpu=cpu,
                       dynamo_backend="inductor" if cfg.compile else "no")


def fit(model: nn.Module, batch_fn: BatchFn, steps: int, cfg: TrainConfig, loss: LossFn = aligned(0.0),
        accelerator: Accelerator | None = None, desc: str = "train", seed_offset: int = 0,
        checkpoints: FitCheckpoints | None = None, copy_model: bool = True,
        on_step: StepCallback | None = None) -> FitResult:
    """Train `model` for `steps` optimizer steps on batches from `batch_fn` minimising `loss` (default: the
    velocity MSE); returns EMA weights.

    By default `model` itself is not modified: training runs on a copy, so a stage can start from
    a shared initial network without disturbing it; copy_model=False trains it in place (large
    UNets, LoRA on a UNet shared with the teacher). Parameters that require grad are trained; if
    none do (a frozen teacher's copy), all are; only they have an EMA (`TrainableEMA`). With `checkpoints`, the full training state
    is saved every `checkpoints.cfg.every` steps (and on SIGTERM inside `stop_on_sigterm`), and
    a resumed fit continues bit for bit where the last checkpoint left off. `on_step(done, ema_model_fn,
    result)` runs after every optimizer step (time-to-quality curves); `ema_model_fn()` returns a copy
    of the EMA model, so the callback cannot disturb training.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ProReflowError(f"training steps must be a positive integer, got {steps!r}")
    acc = accelerator or make_accelerator(cfg)
    world, rank = acc.num_processes, acc.process_index
    if cfg.batch_size % world:
        raise ProReflowError(f"batch_size {cfg.batch_size} is not divisible by the {world} processes")
    per = cfg.batch_size // world
    rows = slice(rank * per, (rank + 1) * per)
    report = (lambda m: print(m, file=sys.stderr)) if acc.is_main_process else (lambda m: None)
    if checkpoints is not None and checkpoints.cfg.resume:
        done_fit = checkpoints.load_final(report)
        if done_fit is not None:  # this stage finished before the interruption
            weights, meta = done_fit
            net = copy.deepcopy(model) if copy_model else model
            try:
                net.load_state_dict(weights)
                return FitResult(model=net.eval(), **meta)
            except (RuntimeError, TypeError) as exc:
                raise ProReflowError(f"the finished stage in {str(checkpoints.root)!r} does not match this model "
                                     f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); resume with the "
                                     f"config that wrote it or start a new run") from None
    net = (copy.deepcopy(model) if copy_model else model).train()
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if not any(p.requires_grad for p in net.parameters()):
        net.requires_grad_(True)
    ema = TrainableEMA(net, cfg.ema_decay)
    opt = make_optimizer([p for p in net.parameters() if p.requires_grad], cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup(cfg.warmup_steps))
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + seed_offset * 7919)
    result = FitResult(model=model)
    done, micro, last_ckpt = 0, 0, None
    if checkpoints is not None and checkpoints.cfg.resume and checkpoints.latest(report) is not None:
        last_ckpt = checkpoints.latest(report)
        done, micro = _restore(last_ckpt, checkpoints, rank, net, ema, opt, sched, gen, result)
    loss_weight = getattr(net, "loss_weight", None)  # students that define how their output errors count
    net, opt, sched = acc.prepare(net, opt, sched)
    ema.to(acc.device)
    bar = tqdm(total=steps, initial=done, desc=desc, disable=not (cfg.progress and acc.is_main_process),
               leave=False, dynamic_ncols=True)

    def save() -> Path:
        assert checkpoints is not None
        return _checkpoint(checkpoints, acc, done, micro, net, ema, opt, sched, gen, result)

    while done < steps:
        batch = batch_fn(micro, gen, rows)
        micro += 1
        with acc.accumulate(net):
            with acc.autocast():
                pred = net(batch.x.to(acc.device), batch.t.to(acc.device), map_cond(batch.cond, lambda c: c.to(acc.device)))
            weight = loss_weight(batch.t.to(acc.device)) if loss_weight is not None else None
            terms = loss(pred, batch.target.to(acc.device), weight)
            finite = bool(torch.isfinite(terms.total))
            if finite:
                acc.backward(terms.total)
            if acc.sync_gradients and finite:
                norm = acc.clip_grad_norm_(net.parameters(), cfg.grad_clip or float("inf"))
                finite = bool(torch.isfinite(norm))
            finite = _all_ranks(acc, finite)
            if not finite:
                result.skipped += 1
                if cfg.on_nonfinite == "stop" or result.skipped > cfg.max_skips:
                    where = str(last_ckpt) if last_ckpt else "none (no checkpoint yet)"
                    raise ProReflowError(
                        f"{desc}: non-finite loss or gradient at step {done} (lr={cfg.lr}); "
                        f"last good checkpoint: {where}. Lower the learning rate or check the data"
                        + (f" ({result.skipped - 1} non-finite steps already skipped)" if result.skipped > 1 else "")
                    )
                opt.zero_grad(set_to_none=True)  # skip-and-count: drop this step's gradients
            else:
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
        result.teacher_nfe += batch.teacher_nfe * world
        result.pairs += batch.x.shape[0] * world if batch.teacher_nfe else 0
        if acc.sync_gradients:
            ema.update(acc.unwrap_model(net, keep_torch_compile=False))
            done += 1
            result.losses.append(float(terms.total.detach()))
            result.directions.append(float(terms.direction.detach()))
            bar.update(1)
            if done % 50 == 0 or done == steps:
                bar.set_postfix(loss=f"{result.losses[-1]:.4f}", cos=f"{1 - result.directions[-1]:.4f}")
            if on_step is not None:
                on_step(done, lambda: _ema_copy(acc.unwrap_model(net, keep_torch_compile=False), ema), result)
            stop = not _all_ranks(acc, not _StopFlag.requested)  # every process stops at the same step
            if checkpoints is not None and done < steps and (done % checkpoints.cfg.every == 0 or stop):
                last_ckpt = save()
            if stop and done < steps:
                bar.close()
                raise TrainingInterrupted(f"{desc}: stopped by SIGTERM at step {done}; "
                                          f"checkpoint: {last_ckpt or 'none (checkpointing is off)'}")
    bar.close()
    result.model = acc.unwrap_model(net, keep_torch_compile=False)
    ema.copy_to(result.model)
    result.model.eval()
    stop = False
    if checkpoints is not None:
        if acc.is_main_process:
            checkpoints.save_final(result.model.state_dict(), result.summary())
        acc.wait_for_everyone()
        # SIGTERM during the last step: this stage is saved whole. Decided by all processes together, or one
        # signalled a moment later than the others would stop while they wait for it in the next stage
        stop = not _all_ranks(acc, not _StopFlag.requested)
    acc.free_memory()
    if stop:
        raise TrainingInterrupted(f"{desc}: stopped by SIGTERM after its last step; checkpoint: {checkpoints.final_path}")
    return result


def _ema_copy(model: nn.Module, ema: TrainableEMA) -> nn.Module:
    out = copy.deepcopy(model).eval()
    ema.copy_to(out)
    return out


def _warmup(warmup_steps: int) -> Callable[[int], float]:
    return lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps else 1.0


def _all_ranks(acc: Accelerator, ok: bool) -> bool:
    """True only if every process saw finite numbers (so all ranks skip or stop together)."""
    if acc.num_processes == 1:
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=acc.device)
    return float(acc.reduce(flag, reduction="sum")) == 0.0


def _checkpoint(ck: FitCheckpoints, acc: Accelerator, done: int, micro: int, net, ema, opt, sched,
                gen: torch.Generator, result: FitResult) -> Path:
    tensors = {f"net.{k}": v for k, v in acc.unwrap_model(net, keep_torch_compile=False).state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    opt_tensors, opt_meta = optimizer_to_flat(getattr(opt, "optimizer", opt))  # unwrap AcceleratedOptimizer
    tensors.update(opt_tensors)
    tensors["rng.generator"] = gen.get_state()
    meta = {"done": done, "micro": micro, "optimizer": opt_meta, "scheduler": _sched_state(sched),
            "result": result.summary(), "world": acc.num_processes}
    rank_state = {**rng_state(), "torch": torch.get_rng_state().tolist()}
    return ck.save(done, tensors, meta, acc.is_main_process, acc.process_index, rank_state, acc.wait_for_everyone)


def _sched_state(sched) -> dict[str, Any]:
    inner = getattr(sched, "scheduler", sched)
    return {k: v for k, v in inner.state_dict().items() if k != "lr_lambdas"}


def _restore(path: Path, ck: FitCheckpoints, rank: int, net, ema, opt, sched, gen: torch.Generator,
             result: FitResult) -> tuple[int, int]:
    tensors, meta, rank_state = ck.load(path, rank)
    try:
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        optimizer_from_flat(opt, tensors, meta["optimizer"])
        sched.load_state_dict({**sched.state_dict(), **meta["scheduler"]})
        gen.set_state(tensors["rng.generator"])
        for k, v in meta["result"].items():
            if k not in FitResult.__dataclass_fields__ or k == "model":
                raise KeyError(k)
            setattr(result, k, v)
        done, micro = int(meta["done"]), int(meta["micro"])
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as exc:
        raise ProReflowError(f"checkpoint {str(path)!r} does not match this model/config ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200]}); resume with the config that wrote it or start "
                             f"a new run") from None
    set_rng_state(rank_state, where=str(path))
    try:
        torch.set_rng_state(torch.tensor(rank_state["torch"], dtype=torch.uint8))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ProReflowError(f"the RNG state in {str(path)!r} is damaged ({type(exc).__name__})") from None
    return done, micro


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
        x0, cond, eps, t = x0[rows], map_cond(cond, lambda c: c[rows]), eps[rows], t[rows]
        x_t = interpolate(x0, eps, t)
        target = exact_velocity(x_t, t, cond) if exact_velocity is not None else path_velocity(x0, eps)
        return TrainBatch(x_t, t, target.to(x0.dtype), cond)

    return batch


def reflow_batches(teacher: VelocityField, data_fn: DataFn, schedule: WindowSchedule, solver: TeacherSolver,
                   batch_size: int, sampling: TimeSampling = TimeSampling()) -> BatchFn:
    """Windowed reflow: fresh teacher pairs for `schedule` each micro-step, a point on each chord.

    Points are drawn at t = t_a - u (t_a - t_b) with u from `sampling` (see `proreflow.time_sampling`:
    the one-step sampler queries each window only at its start). All randomness is drawn for the
    global batch; the teacher only solves this process's rows.
    """

    def batch(_: int, gen: torch.Generator, rows: slice = slice(None)) -> TrainBatch:
        x0, cond = data_fn(batch_size, gen)
        noise = torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
        windows = schedule.sample_windows(x0.shape[0], gen)
        u = sampling.draw(x0.shape[0], gen, x0.dtype)
        x0, cond, noise, windows, u = x0[rows], map_cond(cond, lambda c: c[rows]), noise[rows], windows[rows], u[rows]
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


@dataclass(frozen=True)
class PairCacheConfig:
    """Cache teacher pairs per stage under `dir` instead of generating them on the fly.

    `pairs` per stage; None: one pair per training sample of the stage (steps x global batch). Runs
    whose plans share a stage schedule and seed share its cache (e.g. PeRFlow and its aligned variant).
    """

    dir: Path
    pairs: int | None
    shard_size: int = 10_000


@dataclass
class PlanResult:
    student: nn.Module
    stages: list[FitResult]
    sources: list[str]  # per stage: what made its pairs, "teacher" or "previous_stage"

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


def train_plan(init: nn.Module, teacher: VelocityField, data_fn: DataFn, plan: ProgressivePlan,
               solver: TeacherSolver, cfg: TrainConfig, lam: float, accelerator: Accelerator | None = None,
               desc: str = "reflow", sampling: TimeSampling = TimeSampling(), pair_source: PairSource = "teacher",
               checkpoints: CheckpointConfig | None = None, pair_cache: PairCacheConfig | None = None,
               copy_model: bool = True, on_step: Callable[[int, int, Callable[[], nn.Module], FitResult], None] | None = None
               ) -> PlanResult:
    """Run a progressive plan: stage k+1 starts from stage k's (EMA) student, the first from `init`.

    pair_source="teacher": every stage's pairs come from the fixed teacher's ODE over that stage's
    (wider) windows. pair_source="previous_stage": stage k+1's pairs come from a frozen copy of stage
    k's student, one Euler step per stage-k window (the first stage still uses the teacher).
    `sampling` places the training points on each chord. `on_step(stage, done, ema_model_fn, result)`
    is `fit`'s callback with the 0-based stage index in front.
    """
    if pair_source not in PAIR_SOURCES:
        raise ProReflowError(f"pair_source must be one of {list(PAIR_SOURCES)}, got {pair_source!r}")
    student, stages, sources = init, [], []
    for k, stage in enumerate(plan.stages):
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
            batches = reflow_batches(source, data_fn, stage.schedule, stage_solver, cfg.batch_size, sampling)
        res = fit(student, batches, stage.steps, cfg, loss=aligned(lam), accelerator=accelerator,
                  desc=f"{desc} stage {k + 1}/{len(plan.stages)} (K={stage.schedule.num_windows})", seed_offset=k + 1,
                  checkpoints=checkpoints.for_fit(f"stage-{k + 1}") if checkpoints else None, copy_model=copy_model,
                  on_step=(lambda d, m, r, k=k: on_step(k, d, m, r)) if on_step else None)
        if cached is not None:  # report the teacher cost of the cache, not of the (free) batches drawn from it
            res.teacher_nfe, res.pairs = cached.pairs.teacher_nfe, len(cached)
        stages.append(res)
        sources.append(kind)
        student = res.model
        del source
    return PlanResult(student=student, stages=stages, sources=sources)


def _stage_cache(cfg: PairCacheConfig, stage: int, n_pairs: int, teacher: VelocityField, data_fn: DataFn,
                 schedule: WindowSchedule, solver: TeacherSolver, seed: int, progress: bool) -> CachedPairs:
    """The main process builds (or repairs) the stage's cache; then every process loads it."""
    cache = PairCache(Path(cfg.dir) / f"stage-{stage}")
    state = process_state()
    # one process may stop between shards; with several, the others would wait for it at the barrier
    after_each = (lambda: check_stop(f"while caching the pairs of stage {stage}")) if state.num_processes == 1 else None
    if state.is_main_process:
        cache.ensure(teacher, data_fn, schedule, solver, n_pairs, cfg.shard_size, seed, progress, after_each)
    state.wait_for_everyone()
    return cache.ensure(teacher, data_fn, schedule, solver, n_pairs, cfg.shard_size, seed)
