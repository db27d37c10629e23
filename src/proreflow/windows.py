"""Time windows for piecewise reflow and the progressive plan that merges them.

A `WindowSchedule` is 1 = t_0 > t_1 > ... > t_K = 0; window i is (t_{i+1}, t_i], entered at
its start t_i (the noisier end) where the sampler evaluates the student. A `ProgressivePlan`
is a list of stages whose boundaries nest: each stage's boundaries are a subset of the
previous stage's, so a stage k+1 window is a union of stage k windows (PeRFlow is a
one-stage plan with fixed K; 2-rectified flow is one stage with K = 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from proreflow.errors import ProReflowError

_TOL = 1e-9


#: where uniformly spaced window boundaries u in (0, 1) go in flow time: an increasing map with 0 -> 0 and
#: 1 -> 1 (identity: windows uniform in flow time; `fields.vp.timestep_placement`: uniform in a VP teacher's
#: timesteps, PeRFlow's placement)
BoundaryMap = Callable[[float], float]

@dataclass(frozen=True)
class WindowSchedule:
    """Validated window boundaries, from t = 1 (noise) down to t = 0 (data)."""

    boundaries: tuple[float, ...]

    def __post_init__(self) -> None:
        b = tuple(float(x) for x in self.boundaries)
        object.__setattr__(self, "boundaries", b)
        if len(b) < 2:
            raise ProReflowError(f"a window schedule needs at least 2 boundaries (1 and 0), got {list(b)}")
        if any(x != x or x in (float("inf"), float("-inf")) for x in b):
            raise ProReflowError(f"window boundaries must be finite numbers, got {list(b)}")
        if abs(b[0] - 1.0) > _TOL or abs(b[-1]) > _TOL:
            raise ProReflowError(f"window boundaries must start at 1 (noise) and end at 0 (data), got {list(b)}")
        for hi, lo in zip(b[:-1], b[1:]):
            if not hi > lo:
                raise ProReflowError(
                    f"window boundaries must be strictly decreasing from 1 to 0, got {list(b)} ({hi} then {lo})"
                )

    @classmethod
    def uniform(cls, num_windows: int) -> "WindowSchedule":
        """K equal windows: 1, (K-1)/K, ..., 0."""
        if isinstance(num_windows, bool) or not isinstance(num_windows, int) or num_windows < 1:
            raise ProReflowError(f"number of windows must be a positive integer, got {num_windows!r}")
        return cls(tuple(1.0 - i / num_windows for i in range(num_windows + 1)))

    @property
    def num_windows(self) -> int:
        return len(self.boundaries) - 1

    def starts(self, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """Window starts t_i (the noisier end), shape (K,)."""
        return torch.tensor(self.boundaries[:-1], device=device, dtype=dtype)

    def ends(self, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """Window ends t_{i+1}, shape (K,)."""
        return torch.tensor(self.boundaries[1:], device=device, dtype=dtype)

    def mapped(self, place: "BoundaryMap") -> "WindowSchedule":
        """The same windows with their interior boundaries moved by `place` (1 and 0 stay)."""
        b = self.boundaries
        return WindowSchedule((b[0], *(float(place(x)) for x in b[1:-1]), b[-1]))

    def entered_at(self, t_noise: float) -> tuple[float, ...]:
        """The boundaries with pure noise entering at flow time `t_noise` instead of 1 (a VP teacher's noisiest
        timestep: `conventions.NoiseEntry`); refused when another boundary lies at or above it."""
        b = self.boundaries
        if t_noise >= b[0]:
            return b
        if b[1] >= t_noise - _TOL:
            raise ProReflowError(
                f"window boundary {b[1]:.4g} lies at or above the teacher's noisiest time {t_noise:.4g}, where its "
                f"pure noise enters: use fewer windows, or place them at the teacher's timesteps "
                f"(window_placement: timesteps)")
        return (float(t_noise), *b[1:])

    def steps_per_window(self, steps: int) -> int:
        """Euler steps per window when the whole schedule is sampled in `steps` steps (a multiple of K)."""
        k = self.num_windows
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1 or steps % k:
            raise ProReflowError(f"{steps!r} sampling steps cannot cross {k} windows: the step count must be a "
                                 f"positive multiple of the student's {k} windows")
        return steps // k

    def lengths(self) -> Tensor:
        return self.starts(dtype=torch.float64) - self.ends(dtype=torch.float64)

    def window_index(self, t: Tensor) -> Tensor:
        """Index i of the window (t_{i+1}, t_i] holding each t, batched; t = 0 maps to the last window."""
        # boundaries ascending for bucketize: 0 = b_K < ... < b_0 = 1
        asc = torch.tensor(self.boundaries[::-1], device=t.device, dtype=t.dtype)
        # position j with asc[j-1] < t <= asc[j]; window i = K - j
        j = torch.bucketize(t, asc, right=False).clamp(1, self.num_windows)
        return self.num_windows - j

    def bounds(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample (t_a, t_b): the start and end of the window holding each t."""
        idx = self.window_index(t)
        return self.starts(t.device, t.dtype)[idx], self.ends(t.device, t.dtype)[idx]

    def sample_windows(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Window indices for n samples with probability proportional to window length.

        Equivalent to drawing t uniformly in [0, 1] and looking up its window, so a plan's
        stages all weight time the same way.
        """
        return torch.multinomial(self.lengths().float(), n, replacement=True, generator=generator)

    def is_refined_by(self, other: "WindowSchedule") -> bool:
        """True when every boundary of self is also a boundary of `other` (other is finer)."""
        return all(any(abs(a - b) <= 1e-7 for b in other.boundaries) for a in self.boundaries)


@dataclass(frozen=True)
class Stage:
    """One progressive stage: its windows and its share of the training budget (optimizer steps)."""

    schedule: WindowSchedule
    steps: int

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ProReflowError(f"a stage needs a positive integer number of steps, got {self.steps!r}")


@dataclass(frozen=True)
class ProgressivePlan:
    """Stages of decreasing window count; stage k+1's boundaries are a subset of stage k's."""

    stages: tuple[Stage, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        stages = tuple(self.stages)
        object.__setattr__(self, "stages", stages)
        if not stages:
            raise ProReflowError("a progressive plan needs at least one stage")
        for k, (prev, nxt) in enumerate(zip(stages[:-1], stages[1:])):
            if not nxt.schedule.is_refined_by(prev.schedule):
                raise ProReflowError(
                    f"stage {k + 1} boundaries {list(nxt.schedule.boundaries)} are not a subset of stage {k} "
                    f"boundaries {list(prev.schedule.boundaries)}: progressive stages must merge windows"
                )
            if nxt.schedule.num_windows >= prev.schedule.num_windows:
                raise ProReflowError(
                    f"stage {k + 1} has {nxt.schedule.num_windows} windows, not fewer than stage {k}'s "
                    f"{prev.schedule.num_windows}: progressive stages must merge windows"
                )

    @classmethod
    def from_window_counts(cls, counts: Sequence[int], total_steps: int,
                           fractions: Sequence[float] | None = None) -> "ProgressivePlan":
        """Uniform windows per stage (e.g. [8, 4, 2]) splitting `total_steps` by `fractions` (default equal)."""
        counts = list(counts)
        if not counts:
            raise ProReflowError("a progressive plan needs at least one stage (window counts are empty)")
        if fractions is None:
            fractions = [1.0 / len(counts)] * len(counts)
        fractions = list(fractions)
        if len(fractions) != len(counts):
            raise ProReflowError(f"{len(counts)} stages but {len(fractions)} budget fractions")
        if any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
            raise ProReflowError(f"stage budget fractions must be positive and sum to 1, got {fractions}")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < len(counts):
            raise ProReflowError(f"total steps must be an integer >= the number of stages, got {total_steps!r}")
        steps = [max(1, int(round(f * total_steps))) for f in fractions]
        steps[-1] = total_steps - sum(steps[:-1])  # exact total: the budget is what methods are compared at
        if steps[-1] < 1:
            raise ProReflowError(f"total steps {total_steps} too small for fractions {fractions}")
        return cls(tuple(Stage(WindowSchedule.uniform(c), s) for c, s in zip(counts, steps)))

    def mapped(self, place: "BoundaryMap") -> "ProgressivePlan":
        """Every stage's windows moved by `place`; nesting is kept (the same boundary maps to the same time)."""
        return ProgressivePlan(tuple(Stage(s.schedule.mapped(place), s.steps) for s in self.stages))

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    @property
    def final(self) -> WindowSchedule:
        """The last stage's schedule: the one the student is sampled with."""
        return self.stages[-1].schedule

