"""MLP velocity network for low-dimensional point clouds (the toy teacher and its students)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from proreflow.errors import ProReflowError


class FourierTime(nn.Module):
    """sin/cos features of t at geometric frequencies, so the net resolves fine time structure."""

    def __init__(self, features: int = 32, max_freq: float = 64.0) -> None:
        super().__init__()
        if features % 2:
            raise ProReflowError(f"time features must be even, got {features}")
        freqs = torch.exp(torch.linspace(0.0, math.log(max_freq), features // 2)) * math.pi
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        a = t[:, None] * self.freqs[None].to(t)
        return torch.cat([torch.sin(a), torch.cos(a)], dim=1)


class VelocityMLP(nn.Module):
    """v(x, t) for x of shape (B, dim); SiLU MLP on [x, fourier(t)] with a skip of t at every layer."""

    def __init__(self, dim: int, hidden: int = 256, depth: int = 4, time_features: int = 32) -> None:
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 1:
            raise ProReflowError(f"VelocityMLP needs positive dim/hidden/depth, got {dim}/{hidden}/{depth}")
        self.dim = dim
        self.time = FourierTime(time_features)
        self.inp = nn.Linear(dim + time_features, hidden)
        self.blocks = nn.ModuleList(nn.Linear(hidden + time_features, hidden) for _ in range(depth - 1))
        self.out = nn.Linear(hidden, dim)
        self.act = nn.SiLU()

    def forward(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ProReflowError(f"VelocityMLP expects (B, {self.dim}) inputs, got {tuple(x.shape)}")
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        te = self.time(t.expand(x.shape[0]) if t.ndim == 0 else t)
        h = self.act(self.inp(torch.cat([x, te], dim=1)))
        for blk in self.blocks:
            h = h + self.act(blk(torch.cat([h, te], dim=1)))
        return self.out(h)
