"""A trained velocity network used as a teacher: frozen, evaluated without autograd."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class NetworkTeacher:
    """Wraps `net(x, t, cond) -> v` (our convention) as a frozen velocity field."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net.eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        p = next(self.net.parameters())
        return self.net(x.to(p.dtype), t.to(p.dtype), cond).to(x.dtype)
