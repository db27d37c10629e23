"""Where on a window's chord the student is trained: part of a method's recipe.

A training point sits at t = t_a - u (t_a - t_b) on the chord of its window, u in [0, 1). The
one-step-per-window sampler evaluates the student only at window starts (u = 0), exactly where the
chord target jumps from the previous window's chord to this one's; a network smooth in t and
trained at uniform u lands between the two there. So:

- `uniform`: u ~ U[0, 1 - margin) (PeRFlow's rule); needed when a window is sampled in several steps.
- `start`: u = 0, only where a one-step-per-window sampler looks.
- `mixture`: a fraction `start_fraction` of the batch at u = 0, the rest uniform: for students
  sampled with one step per window and with several.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from proreflow.errors import ProReflowError

TimeRule = Literal["uniform", "start", "mixture"]
TIME_RULES: tuple[str, ...] = ("uniform", "start", "mixture")


@dataclass(frozen=True)
class TimeSampling:
    """The rule for u, the fraction of a window travelled from its start, of each training point."""

    rule: TimeRule = "uniform"
    start_fraction: float = 0.5  # mixture: the share of the batch at window starts
    margin: float = 0.0  # uniform part: the last `margin` of every window is left untrained

    def __post_init__(self) -> None:
        if self.rule not in TIME_RULES:
            raise ProReflowError(f"time sampling rule must be one of {list(TIME_RULES)}, got {self.rule!r}")
        if not (isinstance(self.start_fraction, (int, float)) and 0.0 <= self.start_fraction <= 1.0):
            raise ProReflowError(f"time sampling start_fraction must be in [0, 1], got {self.start_fraction!r}")
        if not (isinstance(self.margin, (int, float)) and math.isfinite(self.margin) and 0.0 <= self.margin < 1.0):
            raise ProReflowError(f"time sampling margin (window_margin) must be in [0, 1), got {self.margin!r}")

    def draw(self, n: int, generator: torch.Generator | None, dtype: torch.dtype = torch.float32) -> Tensor:
        """u for n training points. The uniform draw is made whatever the rule, so that every rule
        consumes the generator alike up to the mixture's own draw (same pairs, same noise)."""
        u = torch.rand(n, generator=generator, dtype=dtype) * (1.0 - self.margin)
        if self.rule == "uniform":
            return u
        if self.rule == "start":
            return torch.zeros_like(u)
        at_start = torch.rand(n, generator=generator) < self.start_fraction
        return torch.where(at_start, torch.zeros_like(u), u)

    @staticmethod
    def parse(text: str | None) -> dict | None:
        """A command-line rule, 'uniform', 'start', 'mixture' or 'mixture:P', as config keys (laid over the
        preset's `time_sampling`, so its margin stays); None (no flag) stays None."""
        if text is None:
            return None
        rule, _, frac = str(text).strip().partition(":")
        if rule not in TIME_RULES or (frac and rule != "mixture"):
            raise ProReflowError(f"--time-sampling must be uniform, start, mixture or mixture:P, got {text!r}")
        out: dict = {"rule": rule}
        if frac:
            try:
                out["start_fraction"] = float(frac)
            except ValueError:
                raise ProReflowError(f"--time-sampling mixture:P needs a number P in [0, 1], got {text!r}") from None
        TimeSampling(**out)  # checks the fraction now, before anything runs
        return out

    def label(self) -> str:
        """Short name for tables: uniform, uniform-m0.1, start, mixture-0.5."""
        if self.rule == "start":
            return "start"
        base = "uniform" if self.rule == "uniform" else f"mixture-{self.start_fraction:g}"
        return base + (f"-m{self.margin:g}" if self.margin else "")
