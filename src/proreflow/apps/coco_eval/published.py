"""Loading published students' weights into diffusers UNets, so that `proreflow evaluate` puts them in the
same table as ours (their samplers are in `proreflow.schedulers`: PeRFlow's `perflow.py`, InstaFlow's
`rectified_flow.py`).

`merge_unet_delta` adds PeRFlow's released weight deltas (W = W_base + dW) to any SD1.5-shaped pipeline;
`load_unet_weights` loads a UNet state-dict file (how Rectified Diffusion releases its students, which then
sample with diffusers' DDIM).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from proreflow.errors import ProReflowError

#: wording of `_check_fits`'s errors: (verb, missing keys, extra keys, the other's shape)
_FIT_WORDS = {"delta": ("does", "have no delta", "deltas have no weight", "its delta"),
              "weights": ("do", "are missing", "are unknown", "the file's")}


def _check_fits(own: dict[str, Tensor], other: dict[str, Tensor], what: str, kind: str) -> None:
    """`other` (a delta or replacement weights) has exactly the UNet's keys, each of the UNet's shape."""
    verb, no_match, unknown, theirs = _FIT_WORDS[kind]
    missing, extra = sorted(set(own) - set(other)), sorted(set(other) - set(own))
    if missing or extra:
        raise ProReflowError(f"{what} {verb} not fit this UNet: {len(missing)} of its weights {no_match} "
                             f"(e.g. {missing[:2]}), {len(extra)} {unknown} (e.g. {extra[:2]})")
    for key, w in own.items():
        if other[key].shape != w.shape:
            raise ProReflowError(f"{what} {verb} not fit this UNet: {key} is {tuple(w.shape)}, "
                                 f"{theirs} {tuple(other[key].shape)}")


@torch.no_grad()
def merge_unet_delta(unet: torch.nn.Module, delta: dict[str, Tensor] | torch.nn.Module, what: str = "the delta") -> None:
    """W <- W + dW for every UNet weight, in float32, cast back to the UNet's dtype (PeRFlow's released
    `perflow-sd15-delta-weights` are such a dW for SD1.5 and its fine-tunes)."""
    delta_sd = delta.state_dict() if isinstance(delta, torch.nn.Module) else delta
    own = unet.state_dict()
    _check_fits(own, delta_sd, what, "delta")
    for key, w in own.items():
        w.copy_((w.float() + delta_sd[key].to(w.device, torch.float32)).to(w.dtype))


def load_unet_delta(path: str, variant: str | None = None) -> dict[str, Tensor]:
    """A UNet weight delta saved as a diffusers UNet (folder or hub id, optionally a weights variant)."""
    from diffusers import UNet2DConditionModel

    kwargs: dict[str, Any] = {"variant": variant} if variant else {}
    try:
        return UNet2DConditionModel.from_pretrained(path, **kwargs).state_dict()
    except (OSError, ValueError) as exc:
        raise ProReflowError(f"cannot load the UNet delta {path!r}{f' (variant {variant})' if variant else ''}: "
                             f"{str(exc).splitlines()[0][:200].rstrip('.')}. Give a diffusers UNet folder or a hub id in "
                             f"your HF cache (e.g. hansyan/perflow-sd15-delta-weights, variant v0-1)") from None


@torch.no_grad()
def load_unet_weights(unet: torch.nn.Module, path: str, what: str = "the UNet weights") -> None:
    """Replace every UNet weight by those of a state-dict file: .safetensors, or a torch pickle (.ckpt, .pt,
    .bin; read with weights_only=True), optionally wrapped in {"state_dict": ...} (Rectified Diffusion's
    `rd.ckpt` and `phased.ckpt` are plain SD1.5 UNet state dicts)."""
    from pathlib import Path

    f = Path(path)
    if not f.is_file():
        raise ProReflowError(f"{what}: no such file {path!r} (give a .safetensors/.ckpt/.pt state dict of the UNet)")
    try:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(f))
        else:
            sd = torch.load(str(f), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same named error
        raise ProReflowError(f"{what}: cannot read {path!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ProReflowError(f"{what}: {path!r} is not a state dict of tensors")
    own = unet.state_dict()
    _check_fits(own, sd, what, "weights")
    for key, w in own.items():
        w.copy_(sd[key].to(w.device, w.dtype))
