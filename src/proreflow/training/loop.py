"""The stage loop: one training loop for flow matching (1-rectified flow) and every reflow stage.

Built on accelerate (device placement, DDP, gradient accumulation, mixed precision); the algorithm (what a
batch is) comes in through a `BatchFn`, so the loop never knows whether it trains a teacher, a PeRFlow
baseline or a progressive ProReflow stage.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import Tensor, nn
from tqdm.auto import tqdm

from proreflow.accel import new_accelerator, process_state
from proreflow.cond import to_device
from proreflow.errors import ProReflowError
from proreflow.losses import LossFn, aligned
from proreflow.training.checkpoint import (
    FitCheckpoints,
    optimizer_from_flat,
    optimizer_to_flat,
    rng_state,
    set_rng_state,
)
from proreflow.training.config import TrainConfig, resolve_batch
from proreflow.training.ema import TrainableEMA
from proreflow.training.monitor import Monitor
from proreflow.training.signals import TrainingInterrupted, stop_requested


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


class Stateful(Protocol):
    """A data source whose position is part of the training state (a stream)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


#: (optimizer steps done in this fit, a function returning a copy of the EMA model, the fit's running
#: result) -> None; the copy is made only when the callback asks for it
StepCallback = Callable[[int, Callable[[], nn.Module], "FitResult"], None]


def check_optimizer(cfg: TrainConfig) -> None:
    """Refuse an optimizer whose package is missing before any work (commands call it before they write a
    folder; `make_optimizer` would refuse only when the first stage starts)."""
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ProReflowError("optimizer adamw8bit needs bitsandbytes and a CUDA GPU: pip install bitsandbytes, "
                                 "or set train.optimizer: adamw") from None


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW (optimizer states in 8 bits: 2 bytes per parameter
    instead of 8, what makes full SDXL fine-tuning fit on 80 GB); bitsandbytes is imported only here."""
    if cfg.optimizer == "adamw8bit":
        check_optimizer(cfg)
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_accelerator(cfg: TrainConfig, cpu: bool | None = None) -> Accelerator:
    """An Accelerator for `cfg`; on a machine without CUDA it runs on CPU."""
    return new_accelerator(cfg.grad_accum, cfg.mixed_precision, cfg.compile, cpu)


def fit(model: nn.Module, batch_fn: BatchFn, steps: int, cfg: TrainConfig, loss: LossFn = aligned(0.0),
        accelerator: Accelerator | None = None, desc: str = "train", seed_offset: int = 0,
        checkpoints: FitCheckpoints | None = None, copy_model: bool = True,
        on_step: StepCallback | None = None, data_state: Stateful | None = None, warmup_done: int = 0,
        monitor: "Monitor | None" = None) -> FitResult:
    """Train `model` for `steps` optimizer steps on batches from `batch_fn` minimising `loss` (default: the
    velocity MSE); returns EMA weights.

    By default `model` itself is not modified: training runs on a copy, so a stage can start from
    a shared initial network without disturbing it; copy_model=False trains it in place (large
    UNets, LoRA on a UNet shared with the teacher). Parameters that require grad are trained; if
    none do (a frozen teacher's copy), all are; only they have an EMA (`TrainableEMA`). With `checkpoints`, the full training state
    is saved every `checkpoints.cfg.every` steps (and on SIGTERM inside `stop_on_sigterm`), and
    a resumed fit continues bit for bit where the last checkpoint left off. `data_state` (a data stream with
    `state_dict` / `load_state_dict`) has its position saved per process with every checkpoint and restored.
    `on_step(done, ema_model_fn, result)` runs after every optimizer step (time-to-quality curves);
    `ema_model_fn()` returns a copy of the EMA model, so the callback cannot disturb training.
    `warmup_done`: optimizer steps of the run's warm-up already taken by earlier stages (`warmup_scope: run`).
    `monitor` (`training.monitor`) receives the step's scalars, per-window errors and validation renders.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ProReflowError(f"training steps must be a positive integer, got {steps!r}")
    cfg = resolve_batch(cfg, accelerator.num_processes if accelerator else process_state().num_processes)
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
            position = checkpoints.load_final_data(rank) if data_state is not None else None
            if position is not None:
                data_state.load_state_dict(position)
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
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup(cfg.warmup_steps, warmup_done))
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + seed_offset * 7919)
    result = FitResult(model=model)
    done, micro, last_ckpt = 0, 0, None
    if checkpoints is not None and checkpoints.cfg.resume and checkpoints.latest(report) is not None:
        last_ckpt = checkpoints.latest(report)
        done, micro, written_by = _restore(last_ckpt, checkpoints, rank, net, ema, opt, sched, gen, result,
                                           data_state)
        if written_by != world:
            report(f"note: resuming on {world} process(es) from {str(last_ckpt)!r}, written by {written_by}: the "
                   f"global batch per optimizer step is kept, the run is not bitwise equal to one without the change")
    loss_weight = getattr(net, "loss_weight", None)  # students that define how their output errors count
    net, opt, sched = acc.prepare(net, opt, sched)
    ema.to(acc.device)
    watch = monitor.watch(steps, done, cfg.batch_size) if monitor is not None else None
    bar = tqdm(total=steps, initial=done, desc=desc, disable=not (cfg.progress and acc.is_main_process),
               leave=False, dynamic_ncols=True)

    def save() -> Path:
        assert checkpoints is not None
        return _checkpoint(checkpoints, acc, done, micro, net, ema, opt, sched, gen, result, data_state)

    while done < steps:
        batch = batch_fn(micro, gen, rows)
        micro += 1
        with acc.accumulate(net):
            with acc.autocast():
                pred = net(batch.x.to(acc.device), batch.t.to(acc.device), to_device(batch.cond, acc.device))
            weight = loss_weight(batch.t.to(acc.device)) if loss_weight is not None else None
            terms = loss(pred, batch.target.to(acc.device), weight)
            finite = bool(torch.isfinite(terms.total))
            norm = None
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
            if watch is not None:
                watch.step(done, terms, pred, batch.target, batch.t, float("nan") if norm is None else float(norm),
                           sched.get_last_lr()[0], ema.decay_used, result.teacher_nfe,
                           lambda: _ema_copy(acc.unwrap_model(net, keep_torch_compile=False), ema))
            stop = not _all_ranks(acc, not stop_requested())  # every process stops at the same step
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
        if data_state is not None:
            checkpoints.save_final_data(rank, _positions(acc, data_state))
            acc.wait_for_everyone()  # every position on disk before the checksums that cover them
        if acc.is_main_process:
            checkpoints.save_final(result.model.state_dict(), result.summary())
        acc.wait_for_everyone()
        # SIGTERM during the last step: this stage is saved whole. Decided by all processes together, or one
        # signalled a moment later than the others would stop while they wait for it in the next stage
        stop = not _all_ranks(acc, not stop_requested())
    acc.free_memory()
    if stop:
        raise TrainingInterrupted(f"{desc}: stopped by SIGTERM after its last step; checkpoint: {checkpoints.final_path}")
    return result


def _ema_copy(model: nn.Module, ema: TrainableEMA) -> nn.Module:
    out = copy.deepcopy(model).eval()
    ema.copy_to(out)
    return out


def _warmup(warmup_steps: int, done: int = 0) -> Callable[[int], float]:
    """Linear warm-up over `warmup_steps` optimizer steps, `done` of which earlier stages took."""
    return lambda s: min(1.0, (s + done + 1) / warmup_steps) if warmup_steps else 1.0


def _all_ranks(acc: Accelerator, ok: bool) -> bool:
    """True only if every process saw finite numbers (so all ranks skip or stop together)."""
    if acc.num_processes == 1:
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=acc.device)
    return float(acc.reduce(flag, reduction="sum")) == 0.0


def _checkpoint(ck: FitCheckpoints, acc: Accelerator, done: int, micro: int, net, ema, opt, sched,
                gen: torch.Generator, result: FitResult, data_state: Stateful | None = None) -> Path:
    tensors = {f"net.{k}": v for k, v in acc.unwrap_model(net, keep_torch_compile=False).state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    opt_tensors, opt_meta = optimizer_to_flat(getattr(opt, "optimizer", opt))  # unwrap AcceleratedOptimizer
    tensors.update(opt_tensors)
    tensors["rng.generator"] = gen.get_state()
    meta = {"done": done, "micro": micro, "optimizer": opt_meta, "scheduler": _sched_state(sched),
            "result": result.summary(), "world": acc.num_processes}
    rank_state = {**rng_state(), "torch": torch.get_rng_state().tolist()}
    if data_state is not None:
        rank_state["data"] = _positions(acc, data_state)
    return ck.save(done, tensors, meta, acc.is_main_process, acc.process_index, rank_state, acc.wait_for_everyone)


def _positions(acc: Accelerator, data_state: Stateful) -> dict[str, Any]:
    """This process's data position, with every process's under "ranks": a resume on another number of
    processes continues the epoch from them (`proreflow.data.stream.continue_split`)."""
    own = data_state.state_dict()
    return {**own, "ranks": gather_object([own]) if acc.num_processes > 1 else [own]}


def _sched_state(sched) -> dict[str, Any]:
    inner = getattr(sched, "scheduler", sched)
    return {k: v for k, v in inner.state_dict().items() if k != "lr_lambdas"}


def _restore(path: Path, ck: FitCheckpoints, rank: int, net, ema, opt, sched, gen: torch.Generator,
             result: FitResult, data_state: Stateful | None = None) -> tuple[int, int, int | str]:
    """Load a checkpoint into the live objects; returns (optimizer steps done, micro-steps done, processes that
    wrote it)."""
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
        done, micro, world = int(meta["done"]), int(meta["micro"]), meta.get("world", "an unknown number of processes")
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as exc:
        raise ProReflowError(f"checkpoint {str(path)!r} does not match this model/config ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200]}); resume with the config that wrote it or start "
                             f"a new run") from None
    set_rng_state(rank_state, where=str(path))
    try:
        torch.set_rng_state(torch.tensor(rank_state["torch"], dtype=torch.uint8))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ProReflowError(f"the RNG state in {str(path)!r} is damaged ({type(exc).__name__})") from None
    if data_state is not None and "data" in rank_state:
        data_state.load_state_dict(rank_state["data"])
    return done, micro, world
