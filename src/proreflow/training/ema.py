"""Exponential moving averages of the trainable parameters (what every stage hands on and evaluates)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn


def ema_with_warmup(decay: float) -> Callable:
    """EMA update whose decay ramps up as min(decay, (1 + n) / (10 + n)) like diffusers' EMAModel,
    so short stages are not dominated by their initial weights."""

    @torch.no_grad()
    def update(ema_params: list[Tensor], params: list[Tensor], num_averaged: Tensor) -> None:
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        torch._foreach_lerp_(ema_params, params, 1.0 - d)

    return update


class TrainableEMA:
    """EMA of a model's trainable parameters only (looked up by name, so wrappers may replace them).

    With LoRA on a frozen UNet this holds adapter-sized copies instead of a second UNet. The first
    update copies the weights; later ones lerp with `ema_with_warmup`'s decay. Frozen parameters
    and buffers need no average: `copy_to` writes the averages into the live model's trainable
    parameters, and everything else is the model's own.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.shadow = [p.detach().clone() for _, p in named]
        self.n_averaged = 0
        self.decay = decay
        self._update = ema_with_warmup(decay)

    def _params(self, model: nn.Module) -> list[Tensor]:
        params = dict(model.named_parameters())
        return [params[n] for n in self.names]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = [p.detach() for p in self._params(model)]
        if self.n_averaged == 0:
            torch._foreach_copy_(self.shadow, current)
        else:
            self._update(self.shadow, current, torch.tensor(self.n_averaged))
        self.n_averaged += 1

    @property
    def decay_used(self) -> float:
        """The decay of the latest update (0 for the first, a copy): the warm-up ramp of `ema_with_warmup`."""
        n = self.n_averaged - 1
        return 0.0 if n <= 0 else min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for p, s in zip(self._params(model), self.shadow):
            p.copy_(s)

    def to(self, device: torch.device | str) -> "TrainableEMA":
        self.shadow = [s.to(device) for s in self.shadow]
        return self

    def numel(self) -> int:
        return sum(s.numel() for s in self.shadow)

    def state_dict(self) -> dict[str, Tensor]:
        return {"n_averaged": torch.tensor(self.n_averaged), **dict(zip(self.names, self.shadow))}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if set(state) != {"n_averaged", *self.names}:
            raise KeyError("EMA tensors do not match this model's trainable parameters")
        self.shadow = [state[n].to(s.device, s.dtype).clone() for n, s in zip(self.names, self.shadow)]
        self.n_averaged = int(state["n_averaged"])
