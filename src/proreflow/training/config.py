"""Optimisation settings shared by every stage of a run (the budget itself lives in the plan)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

from proreflow.errors import ProReflowError


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by every stage (the budget itself lives in the plan).

    `batch_size` is global: the samples of one micro-step over all processes, each process keeping its rows.
    With `per_device_batch` set, `batch_size` is instead the global batch of one optimizer step, and gradient
    accumulation makes it up on any number of processes: grad_accum = batch_size / (per_device_batch x
    processes) (`resolve_batch`). Without it, an optimizer step sees batch_size x grad_accum samples.
    """

    lr: float = 1e-3
    batch_size: int = 256
    ema_decay: float = 0.999
    grad_accum: int = 1
    per_device_batch: int | None = None
    grad_clip: float | None = 1.0
    weight_decay: float = 0.0
    warmup_steps: int = 0
    # "run": one warm-up over a progressive plan's first optimizer steps, later stages start at the full lr (with
    # fresh AdamW moments); "stage": every stage warms up again (before this release: half of each 2000-step
    # SD stage was warm-up). The choice was measured on the mini Stable Diffusion (docs/mini-sd.md)
    warmup_scope: Literal["run", "stage"] = "run"
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
            (self.per_device_batch is None or (self.per_device_batch >= 1 and self.grad_accum == 1),
             f"per_device_batch must be >= 1 and leaves grad_accum at 1 (it is derived), got "
             f"{self.per_device_batch}, grad_accum {self.grad_accum}"),
            (self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be positive or null, got {self.grad_clip}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (self.warmup_scope in ("run", "stage"), f"warmup_scope must be 'run' or 'stage', got {self.warmup_scope!r}"),
            (self.mixed_precision in ("no", "fp16", "bf16"), f"mixed_precision must be no/fp16/bf16, got {self.mixed_precision!r}"),
            (self.on_nonfinite in ("stop", "skip"), f"on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}"),
            (self.max_skips >= 0, f"max_skips must be >= 0, got {self.max_skips}"),
            (self.optimizer in ("adamw", "adamw8bit"), f"optimizer must be 'adamw' or 'adamw8bit', got {self.optimizer!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ProReflowError(msg)


def resolve_batch(cfg: TrainConfig, processes: int) -> TrainConfig:
    """The micro-step settings on `processes` processes: with `per_device_batch`, the global batch per optimizer
    step (`batch_size`) is reached by gradient accumulation; otherwise `cfg` as it is."""
    if cfg.per_device_batch is None:
        return cfg
    micro = cfg.per_device_batch * processes
    if cfg.batch_size % micro:
        raise ProReflowError(f"the global batch {cfg.batch_size} is not a multiple of per_device_batch "
                             f"{cfg.per_device_batch} x {processes} process(es) = {micro}; change train.batch_size, "
                             f"train.per_device_batch or the number of processes")
    return replace(cfg, batch_size=micro, grad_accum=cfg.batch_size // micro, per_device_batch=None)


def describe_batch(cfg: TrainConfig, processes: int, stage_steps: list[int]) -> str:
    """One line for the log: the global batch, how it is made, and the samples each stage will see."""
    r = resolve_batch(cfg, processes)
    per_step = r.batch_size * r.grad_accum
    stages = ", ".join(f"stage {i + 1}: {n} steps x {per_step} = {n * per_step:,} samples"
                       for i, n in enumerate(stage_steps))
    return (f"global batch {per_step} = {r.batch_size // processes} per device x {processes} process(es) x "
            f"{r.grad_accum} accumulation step(s); {stages}")
