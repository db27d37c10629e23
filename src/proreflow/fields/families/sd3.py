"""Stable Diffusion 3 / 3.5: an MMDiT transformer trained by flow matching (it predicts our velocity), two CLIP
text encoders and an optional T5, a VAE with a shift factor, and a time shift (3.0 for SD3 medium) that the
windows and the teacher grid follow (`flow.py`)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from proreflow.fields.families import register
from proreflow.fields.families.flow import FlowFamily


@register
class SD3(FlowFamily):
    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)

    def prompt_embeds(self, pipe: Any, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """The pipeline's own prompt encoding: two CLIPs (+ T5 when present), and the pooled projections."""
        embeds, _, pool, _ = pipe.encode_prompt(prompts, prompts, prompts, device=pipe.text_encoder.device,
                                                do_classifier_free_guidance=False)
        return embeds, pool

    def image_seq_len(self, pipe: Any, resolution: int) -> int:
        """As StableDiffusion3Pipeline: latent height and width over the transformer's patch size."""
        f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        side = (resolution // f) // pipe.transformer.config.patch_size
        return side * side
