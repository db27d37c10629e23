"""Conditioning as it travels with pairs, batches and caches: None, a tensor, or (nested) dicts of tensors.

Kept apart from `pairs` so that what selects rows of a conditioning or moves it to a device does not import the pair
module (fields, the training loop and the SD app all handle conditioning, few of them handle pairs)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from proreflow.errors import ProReflowError


def map_cond(cond: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply `fn` to every tensor of a conditioning (None, a tensor, or a dict of them), e.g. to
    select rows or move devices, so conditioning travels with its pairs whatever its shape."""
    if isinstance(cond, Tensor):
        return fn(cond)
    if isinstance(cond, dict):
        return {k: map_cond(v, fn) for k, v in cond.items()}
    return cond


def take(cond: Any, rows: Tensor | slice) -> Any:
    """The rows `rows` (an index tensor or a slice) of every tensor of a conditioning."""
    return map_cond(cond, lambda c: c[rows])


def to_device(cond: Any, device: torch.device | str) -> Any:
    """Every tensor of a conditioning on `device`."""
    return map_cond(cond, lambda c: c.to(device))


def flatten_cond(cond: Any, prefix: str = "cond") -> dict[str, Tensor]:
    """A conditioning (tensor, dict of them, nested dicts) as flat `prefix.key.subkey` tensors."""
    if isinstance(cond, Tensor):
        return {prefix: cond}
    if isinstance(cond, dict):
        out: dict[str, Tensor] = {}
        for key, sub in cond.items():
            if "." in key:
                raise ProReflowError(f"conditioning keys may not contain '.', got {key!r}")
            out.update(flatten_cond(sub, f"{prefix}.{key}"))
        return out
    if cond is None:
        return {}
    raise ProReflowError(f"cannot cache conditioning of type {type(cond).__name__}; use tensors or dicts of them")


def unflatten_cond(tensors: dict[str, Tensor], prefix: str = "cond") -> Any:
    """Inverse of `flatten_cond` (None when no key has the prefix)."""
    if prefix in tensors:
        return tensors[prefix]
    out: dict = {}
    for k, v in tensors.items():
        if k.startswith(prefix + "."):
            *path, last = k[len(prefix) + 1:].split(".")
            d = out
            for part in path:
                d = d.setdefault(part, {})
            d[last] = v
    return out or None
