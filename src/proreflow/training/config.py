"""Optimisation settings shared by every stage of a run (the budget itself lives in the plan)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from proreflow.errors import ProReflowError


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
