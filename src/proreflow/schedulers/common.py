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
    """Finds the current step from the timestep a pipeline hands back (pipelines pass the value)."""

    timesteps: Tensor

    def _index(self, timestep: Any) -> int:
        value = float(timestep.item() if isinstance(timestep, Tensor) else timestep)
        hits = (self.timesteps.detach().cpu().double() - value).abs() < 1e-3
        if not bool(hits.any()):
            raise ProReflowError(f"timestep {value:g} is not one of this scheduler's timesteps "
                                 f"{[round(float(t), 3) for t in self.timesteps]}; call set_timesteps() first")
        return int(hits.nonzero()[0, 0])
