"""Methods as configs: every compared method is a window plan plus a direction weight.

teacher Euler at k steps     -> no training
2-rectified flow             -> windows [1], lam 0
PeRFlow                      -> windows [k], lam 0
ProReflow w/o aligned        -> windows "8->k" (halving 8, 4, ..., k), lam 0
ProReflow w/o progressive    -> windows [k], lam > 0
ProReflow (full)             -> windows "8->k", lam > 0
Window entries may refer to the sampling step count k ("k", "2k", ...), so one preset
serves 2-step and 4-step students. A method also says where on each chord it trains
(`time_sampling`, see `proreflow.time_sampling`) and where a later stage's pairs come from
(`pair_source`): the frozen teacher's ODE over each wider window (`teacher`), or the previous
stage's student, one Euler step per previous-stage window (`previous_stage`, reflow in the sense
of Liu et al.: far cheaper than a many-step teacher solve).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from proreflow.errors import ProReflowError
from proreflow.losses import check_lambda
from proreflow.time_sampling import TimeSampling
from proreflow.windows import ProgressivePlan

PairSource = Literal["teacher", "previous_stage"]
PAIR_SOURCES: tuple[str, ...] = ("teacher", "previous_stage")
LossWeighting = Literal["output", "velocity"]
LOSS_WEIGHTINGS: tuple[str, ...] = ("output", "velocity")

_MULT = re.compile(r"^\s*(\d*)\s*k\s*$")


@dataclass(frozen=True)
class MethodSpec:
    """One compared method. `windows` is a list of per-stage window counts or a halving chain 'N->k'."""

    name: str
    train: bool = True
    windows: list[int | str] | str = field(default_factory=lambda: ["k"])
    lam: float = 0.0
    stage_fractions: list[float] | None = None
    time_sampling: TimeSampling | None = None  # None: the app config's `time_sampling`
    pair_source: PairSource = "teacher"
    # how the velocity MSE counts each sample: `velocity` unweighted, where a one-step-per-window sampler makes its
    # error; `output` in the student's own output space (the field's `loss_weight`: an eps student's eps MSE), which
    # weighs SD's first window 0.004 against 0.35 for its last and leaves it untrained (docs/sd-distillation.md)
    loss_weighting: LossWeighting = "velocity"

    def __post_init__(self) -> None:
        if not self.name:
            raise ProReflowError("a method needs a non-empty name")
        check_lambda(self.lam, f"method {self.name!r}: lam")
        if self.pair_source not in PAIR_SOURCES:
            raise ProReflowError(f"method {self.name!r}: pair_source must be one of {list(PAIR_SOURCES)}, "
                                 f"got {self.pair_source!r}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ProReflowError(f"method {self.name!r}: loss_weighting must be one of {list(LOSS_WEIGHTINGS)}, "
                                 f"got {self.loss_weighting!r}")

    def sampling(self, default: TimeSampling) -> TimeSampling:
        """This method's time-sampling rule, or the app's default when it names none."""
        return self.time_sampling if self.time_sampling is not None else default

    def window_counts(self, k: int) -> list[int]:
        """Resolve the per-stage window counts for a k-step student."""
        if isinstance(self.windows, str):
            if "->" not in self.windows:
                return [_resolve(self.windows, k, self.name)]
            left, right = self.windows.split("->", 1)
            start, end = _resolve(left, k, self.name), _resolve(right, k, self.name)
            counts = [start]
            while counts[-1] > end:
                if counts[-1] % 2:
                    raise ProReflowError(f"method {self.name!r}: cannot halve {start} windows down to {end}")
                counts.append(counts[-1] // 2)
            if counts[-1] != end:
                raise ProReflowError(f"method {self.name!r}: halving {start} does not reach {end} windows")
            return counts
        if not self.windows:
            raise ProReflowError(f"method {self.name!r}: windows list is empty")
        return [_resolve(w, k, self.name) for w in self.windows]

    def plan(self, k: int, total_steps: int) -> ProgressivePlan:
        counts = self.window_counts(k)
        if k % counts[-1]:
            raise ProReflowError(
                f"method {self.name!r}: a {k}-step sampler cannot step through {counts[-1]} final windows "
                f"(steps must be a multiple of the final window count)"
            )
        return ProgressivePlan.from_window_counts(counts, total_steps, self.stage_fractions)

    def plan_key(self, k: int, default_sampling: TimeSampling = TimeSampling()) -> tuple:
        """Methods/step counts that resolve to the same training share one trained student."""
        key = (tuple(self.window_counts(k)), self.lam, tuple(self.stage_fractions or ()),
               self.sampling(default_sampling), self.pair_source)
        return key if self.loss_weighting == "velocity" else (*key, self.loss_weighting)


def _resolve(entry: int | str, k: int, name: str) -> int:
    if isinstance(entry, bool):
        raise ProReflowError(f"method {name!r}: bad window count {entry!r}")
    if isinstance(entry, int):
        value = entry
    else:
        m = _MULT.match(str(entry))
        if m:
            value = int(m.group(1) or 1) * k
        elif str(entry).strip().isdigit():
            value = int(str(entry).strip())
        else:
            raise ProReflowError(f"method {name!r}: window count {entry!r} is not an integer, 'k' or '<n>k'")
    if value < 1:
        raise ProReflowError(f"method {name!r}: window count must be >= 1, got {value}")
    return value
