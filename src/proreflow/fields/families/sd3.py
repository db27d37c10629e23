"""Stable Diffusion 3 / 3.5: an MMDiT transformer trained by flow matching (it predicts our velocity), two CLIP
text encoders and an optional T5, a VAE with a shift factor, and a time shift (3.0 for SD3 medium) that the
windows and the teacher grid follow (`flow.py`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from proreflow.fields.families import register
from proreflow.fields.families.flow import FlowFamily


@register
class SD3(FlowFamily):
    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)

    @torch.no_grad()
    def encode_text(self, pipe: Any, prompts: list[str], batch: int = 64) -> dict[str, Tensor]:
        """The pipeline's own prompt encoding: two CLIPs (+ T5 when present), and the pooled projections."""
        states, pooled = [], []
        device = pipe.text_encoder.device
        for i in range(0, len(prompts), batch):
            chunk = prompts[i:i + batch]
            embeds, _, pool, _ = pipe.encode_prompt(chunk, chunk, chunk, device=device,
                                                    do_classifier_free_guidance=False)
            states.append(embeds.float().cpu())
            pooled.append(pool.float().cpu())
        return {"encoder_hidden_states": torch.cat(states), "pooled_projections": torch.cat(pooled)}

    def image_seq_len(self, pipe: Any, resolution: int) -> int:
        """As StableDiffusion3Pipeline: latent height and width over the transformer's patch size."""
        f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        side = (resolution // f) // pipe.transformer.config.patch_size
        return side * side
