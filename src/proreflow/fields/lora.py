"""The teacher of a LoRA student: the student's own network with its adapters switched off.

One network's weights serve both: the student trains adapters (peft) on the frozen base, and the teacher
is the same field evaluated with the adapters disabled, so no second copy of a 1-3B-parameter network
is held.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from proreflow.conventions import ModuleField, NoiseEntry, as_teacher


class AdaptersOff(ModuleField, nn.Module):
    """`field` (a velocity field over `network`) called with `network`'s adapters disabled."""

    def __init__(self, field: nn.Module, network: nn.Module) -> None:
        super().__init__()
        self.field = field
        object.__setattr__(self, "_network", network)  # not a second submodule: `field` already holds it

    @property
    def noise_entry(self) -> NoiseEntry:
        """The wrapped field's."""
        return as_teacher(self.field).noise_entry

    def guidance(self) -> float:
        """The wrapped field's (its weights are this module's)."""
        return self.field.guidance() if isinstance(self.field, ModuleField) else 1.0

    def forward(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        self._network.disable_adapters()
        try:
            return self.field(x, t, cond)
        finally:
            self._network.enable_adapters()
