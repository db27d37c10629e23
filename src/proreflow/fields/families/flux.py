"""FLUX.1 (dev and schnell): a flow-matching transformer on 2x2-packed VAE latents, a CLIP (pooled) and a T5 text
encoder, a VAE with a shift factor, a resolution-dependent time shift (`use_dynamic_shifting`), and for dev a
guidance embedding instead of classifier-free guidance.

- **Latents** stay unpacked, (B, C, h, w), in pairs, caches and our samplers, so FluxPipeline's noise (drawn
  unpacked, then packed) is ours; `FluxVelocity` packs them for the transformer and unpacks its output, and builds
  the position ids from the shape, as FluxPipeline does.
- **Time**: FluxPipeline calls the transformer with sigma (`timestep / 1000`), our flow time itself.
- **Guidance embedding (dev)**: the teacher's pairs and the student are both evaluated at `GUIDANCE`, FluxPipeline's
  default `guidance_scale` (3.5). Sample the student at that `guidance_scale`: for a guidance-distilled model it is
  the embedding, not classifier-free guidance, so `teacher_guidance` (true CFG on the teacher) is refused.
- **Shift**: mu from the training resolution's token count (`calculate_shift`); FluxPipeline passes sigmas
  linspace(1, 1/N, N), which the shift maps onto f(1 - j/N): the teacher grid and the windows sit exactly there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from proreflow.conventions import ModuleField
from proreflow.errors import ProReflowError
from proreflow.fields.families import register
from proreflow.fields.families.flow import FlowFamily
from proreflow.fields.network import guided_call, to_network
from proreflow.windows import WindowSchedule

#: the guidance embedding FLUX-dev's pairs and student use: FluxPipeline's default guidance_scale
GUIDANCE = 3.5


def pack(x: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C), FluxPipeline's `_pack_latents` (tested against it)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: Tensor, h: int, w: int) -> Tensor:
    """Inverse of `pack`, FluxPipeline's `_unpack_latents` at latent size (h, w)."""
    b, _, c4 = x.shape
    return x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The packed tokens' (0, row, column) position ids, FluxPipeline's `_prepare_latent_image_ids`."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxVelocity(ModuleField, nn.Module):
    """A FLUX transformer as a velocity field on unpacked latents (teacher or student). `cond` holds
    `encoder_hidden_states` (T5) and `pooled_projections` (CLIP), per sample; the guidance embedding is the
    field's `guidance` (None for schnell, whose transformer has none)."""

    def __init__(self, net: nn.Module, guidance: float | None = GUIDANCE) -> None:
        super().__init__()
        self.net = net
        self.guidance = guidance if net.config.guidance_embeds else None

    def _call(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        cast = to_network(self.net)
        b, _, h, w = x.shape
        text = cast(cond["encoder_hidden_states"])
        dt = text.dtype
        out = self.net(hidden_states=cast(pack(x)), timestep=cast(t.expand(b)),
                       guidance=None if self.guidance is None else torch.full((b,), self.guidance, device=text.device,
                                                                              dtype=torch.float32),
                       pooled_projections=cast(cond["pooled_projections"]), encoder_hidden_states=text,
                       txt_ids=torch.zeros(text.shape[1], 3, device=text.device, dtype=dt),
                       img_ids=image_ids(h, w, text.device, dt), return_dict=False)[0]
        return unpack(out, h, w).to(x.device, x.dtype)

    def forward(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        if not isinstance(cond, dict) or "encoder_hidden_states" not in cond:
            raise ProReflowError("a FLUX transformer needs text conditioning (encoder_hidden_states and "
                                 "pooled_projections)")
        return guided_call(lambda c: self._call(x, t, c), cond, 1.0)


@register
class Flux(FlowFamily):
    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    max_sequence_length = 512  # FluxPipeline's default: the student sees the text as it will at sampling

    def field(self, pipe: Any, network: nn.Module | None = None, guidance_scale: float = 1.0) -> nn.Module:
        if guidance_scale != 1.0:
            raise ProReflowError(f"FLUX is guidance-distilled: its teacher takes a guidance embedding "
                                 f"({GUIDANCE}, FluxPipeline's default), not classifier-free guidance; set "
                                 f"teacher_guidance to 1 (got {guidance_scale:g})")
        return FluxVelocity(network if network is not None else self.denoiser(pipe))

    def prompt_embeds(self, pipe: Any, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """FluxPipeline's own prompt encoding: T5 states and the CLIP pooled projection."""
        embeds, pool, _ = pipe.encode_prompt(prompts, None, device=pipe.text_encoder.device,
                                             max_sequence_length=self.max_sequence_length)
        return embeds, pool

    def latent_shape(self, pipe: Any, resolution: int) -> tuple[int, int, int]:
        f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        if resolution % (2 * f):
            raise ProReflowError(f"a FLUX resolution must be a multiple of {2 * f} (the VAE's factor {f} times the "
                                 f"2x2 packing), got {resolution}")
        return super().latent_shape(pipe, resolution)

    def image_seq_len(self, pipe: Any, resolution: int) -> int:
        """As FluxPipeline: the packed latents' token count, (resolution / f / 2)^2."""
        side = self.latent_shape(pipe, resolution)[1] // 2
        return side * side

    def pipeline_sigmas(self, scheduler: Any, k: int) -> list[float]:
        """FluxPipeline passes sigmas linspace(1, 1/K, K) (and mu, which a static shift ignores)."""
        scheduler.set_timesteps(sigmas=[1.0 - j / k for j in range(k)])
        return scheduler.sigmas.tolist()

    def stock_overrides(self, s: float, windows: WindowSchedule) -> list[dict]:
        """The teacher's scheduler with its shift fixed at the training resolution's (static, no terminal
        stretch): FluxPipeline's uniform sigmas then land on the K windows at K steps, at any resolution."""
        return [dict(shift=s, use_dynamic_shifting=False, shift_terminal=None)]
