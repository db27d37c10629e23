"""Methods as configs: every compared method is a window plan plus a direction weight.

teacher Euler at k steps     -> no training
2-rectified flow             -> windows [1], lam 0
PeRFlow                      -> windows [k], lam 0
ProReflow w/o aligned        -> windows "8->k" (halving 8, 4, ..., k), lam 0
ProReflow w/o progressive    -> windows [k], lam > 0
ProReflow (full)             -> windows "8->k", lam > 0
Window entries may refer to the sampling step count k ("k", "2k", ...), so one preset
serves 2-step and 4-step students.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from proreflow.errors import ProReflowError
from proreflow.windows import ProgressivePlan

_MULT = re.compile(r"^\s*(\d*)\s*k\s*$")


@dataclass(frozen=True)
class MethodSpec:
    """One compared method. `windows` is a list of per-stage window counts or a halving chain 'N->k'."""

    name: str
    train: bool = True
    windows: list[int | str] | str = field(default_factory=lambda: ["k"])
    lam: float = 0.0
    stage_fractions: list[float] | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ProReflowError("a method needs a non-empty name")
        if self.lam < 0:
            raise ProReflowError(f"method {self.name!r}: lam must be >= 0, got {self.lam}")

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

    def plan_key(self, k: int) -> tuple:
        """Methods/step counts that resolve to the same training share one trained student."""
        return (tuple(self.window_counts(k)), self.lam, tuple(self.stage_fractions or ()))


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
