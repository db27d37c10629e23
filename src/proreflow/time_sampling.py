"""Where on a window's chord the student is trained: part of a method's recipe.

A training point sits at t = t_a - u (t_a - t_b) on the chord of its window, u in [0, 1). The
one-step-per-window sampler evaluates the student only at window starts (u = 0), exactly where the
chord target jumps from the previous window's chord to this one's; a network smooth in t and
trained at uniform u lands between the two there. So:

- `uniform`: u ~ U[0, 1 - margin) (PeRFlow's rule); needed when a window is sampled in several steps.
- `start`: u = 0, only where a one-step-per-window sampler looks.
- `mixture`: a fraction `start_fraction` of the batch at u = 0, the rest uniform: for students
  sampled with one step per window and with several.

Each rule is a small registered class (`RULES`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from proreflow.errors import ProReflowError


class TimeRule:
    """One rule for u. Adding a rule is one subclass with `@register` (and its test): `TimeSampling`, the presets'
    `time_sampling.rule`, the CLI's `--time-sampling` and its help all read the registry."""

    name: ClassVar[str]
    takes_fraction: ClassVar[bool] = False  # parameterised by `start_fraction` (`--time-sampling name:P`)
    help: ClassVar[str]

    def choose(self, u: Tensor, sampling: "TimeSampling", generator: torch.Generator | None) -> Tensor:
        """u for the batch, given the uniform draw `u` that every rule receives (drawn first, whatever the rule,
        so that every rule consumes the generator alike up to its own draws)."""
        raise NotImplementedError

    def label(self, sampling: "TimeSampling") -> str:
        return self.name + self.margin_suffix(sampling)

    @staticmethod
    def margin_suffix(sampling: "TimeSampling") -> str:
        """"-m<margin>" when the uniform part stops short of the window end, else ""."""
        return f"-m{sampling.margin:g}" if sampling.margin else ""


RULES: dict[str, TimeRule] = {}


def register(cls: type[TimeRule]) -> type[TimeRule]:
    """Class decorator: make the rule drawable by its `name`."""
    if cls.name in RULES:
        raise ProReflowError(f"time sampling rule {cls.name!r} is registered twice")
    RULES[cls.name] = cls()
    return cls


@register
class Uniform(TimeRule):
    name = "uniform"
    help = "u ~ U[0, 1 - margin) (PeRFlow's rule)"

    def choose(self, u: Tensor, sampling: "TimeSampling", generator: torch.Generator | None) -> Tensor:
        return u


@register
class Start(TimeRule):
    name = "start"
    help = "u = 0, where a one-step-per-window sampler looks"

    def choose(self, u: Tensor, sampling: "TimeSampling", generator: torch.Generator | None) -> Tensor:
        return torch.zeros_like(u)

    def label(self, sampling: "TimeSampling") -> str:
        return "start"  # no uniform part, so no margin


@register
class Mixture(TimeRule):
    name = "mixture"
    takes_fraction = True
    help = "a share P of the batch at u = 0, the rest uniform"

    def choose(self, u: Tensor, sampling: "TimeSampling", generator: torch.Generator | None) -> Tensor:
        at_start = torch.rand(u.shape[0], generator=generator) < sampling.start_fraction
        return torch.where(at_start, torch.zeros_like(u), u)

    def label(self, sampling: "TimeSampling") -> str:
        return f"mixture-{sampling.start_fraction:g}" + self.margin_suffix(sampling)


def rules_help() -> str:
    """The rules as `--time-sampling` accepts them: 'uniform, start, mixture or mixture:P'."""
    names = [n for r in RULES.values() for n in (r.name, f"{r.name}:P")[:1 + r.takes_fraction]]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else "".join(names)


@dataclass(frozen=True)
class TimeSampling:
    """The rule for u, the fraction of a window travelled from its start, of each training point (the rule by its
    registered name, so that presets and summaries keep plain strings)."""

    rule: str = "uniform"
    start_fraction: float = 0.5  # mixture: the share of the batch at window starts
    margin: float = 0.0  # uniform part: the last `margin` of every window is left untrained

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ProReflowError(f"time sampling rule must be one of {list(RULES)}, got {self.rule!r}")
        if not (isinstance(self.start_fraction, (int, float)) and 0.0 <= self.start_fraction <= 1.0):
            raise ProReflowError(f"time sampling start_fraction must be in [0, 1], got {self.start_fraction!r}")
        if not (isinstance(self.margin, (int, float)) and math.isfinite(self.margin) and 0.0 <= self.margin < 1.0):
            raise ProReflowError(f"time sampling margin (window_margin) must be in [0, 1), got {self.margin!r}")

    def draw(self, n: int, generator: torch.Generator | None, dtype: torch.dtype = torch.float32) -> Tensor:
        """u for n training points. The uniform draw is made whatever the rule, so that every rule
        consumes the generator alike up to the rule's own draws (same pairs, same noise)."""
        u = torch.rand(n, generator=generator, dtype=dtype) * (1.0 - self.margin)
        return RULES[self.rule].choose(u, self, generator)

    @staticmethod
    def parse(text: str | None) -> dict | None:
        """A command-line rule ('uniform', 'start', 'mixture' or 'mixture:P', see `rules_help`) as config keys (laid
        over the preset's `time_sampling`, so its margin stays); None (no flag) stays None."""
        if text is None:
            return None
        rule, _, frac = str(text).strip().partition(":")
        if rule not in RULES or (frac and not RULES[rule].takes_fraction):
            raise ProReflowError(f"--time-sampling must be {rules_help()}, got {text!r}")
        out: dict = {"rule": rule}
        if frac:
            try:
                out["start_fraction"] = float(frac)
            except ValueError:
                raise ProReflowError(f"--time-sampling {rule}:P needs a number P in [0, 1], got {text!r}") from None
        TimeSampling(**out)  # checks the fraction now, before anything runs
        return out

    def label(self) -> str:
        """Short name for tables: uniform, uniform-m0.1, start, mixture-0.5."""
        return RULES[self.rule].label(self)
