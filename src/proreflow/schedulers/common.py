"""What the flow schedulers share: their step output and the lookup of the step a pipeline is at."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffusers.utils import BaseOutput
from torch import Tensor

from proreflow.errors import ProReflowError


@dataclass
class FlowSchedulerOutput(BaseOutput):
    prev_sample: Tensor
    pred_original_sample: Tensor | None = None


class _TimestepIndex:
    """Finds the current step from the timestep a pipeline hands back (pipelines pass the value).

    The step after the last one is tried first, so a grid that repeats a timestep (PeRFlow's truncated integers
    at ~1000 steps: ..., 933, 933, ...) is walked step by step instead of taking the first match twice (a
    zero-length step, and the step after it lost). `set_timesteps` resets the walk (`_step_index = None`)."""

    timesteps: Tensor
    _step_index: int | None = None  # the index the next step is expected at

    def _index(self, timestep: Any) -> int:
        value = float(timestep.item() if isinstance(timestep, Tensor) else timestep)
        grid = self.timesteps.detach().cpu().double()
        i = self._step_index
        if i is None or i >= len(grid) or abs(float(grid[i]) - value) >= 1e-3:
            hits = (grid - value).abs() < 1e-3
            if not bool(hits.any()):
                raise ProReflowError(f"timestep {value:g} is not one of this scheduler's timesteps "
                                     f"{[round(float(t), 3) for t in self.timesteps]}; call set_timesteps() first")
            i = int(hits.nonzero()[0, 0])
        self._step_index = i + 1
        return i
