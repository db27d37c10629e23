"""Stable Diffusion XL: an SD-style VP UNet with two CLIP text encoders, a pooled text embedding and size ids
(`added_cond_kwargs`), and a VAE that may carry a latent mean and std."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from proreflow.fields.families import register
from proreflow.fields.families.sd import VPFamily


@register
class SDXL(VPFamily):
    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)

    @torch.no_grad()
    def encode_text(self, pipe: Any, prompts: list[str], batch: int = 64) -> dict[str, Tensor]:
        """As `StableDiffusionXLPipeline.encode_prompt`: both encoders' penultimate hidden states concatenated
        (`encoder_hidden_states`) and text_encoder_2's pooled projection (`text_embeds`)."""
        encoders = [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]
        states, pooled = [], []
        for i in range(0, len(prompts), batch):
            chunk, parts = prompts[i:i + batch], []
            for tok, enc in encoders:
                if tok is None or enc is None:
                    continue
                ids = tok(chunk, padding="max_length", max_length=tok.model_max_length, truncation=True,
                          return_tensors="pt").input_ids.to(enc.device)
                out = enc(ids, output_hidden_states=True)
                parts.append(out.hidden_states[-2])
                if enc is pipe.text_encoder_2:
                    pooled.append(out[0].float().cpu())
            states.append(torch.cat(parts, dim=-1).float().cpu())
        return {"encoder_hidden_states": torch.cat(states), "text_embeds": torch.cat(pooled)}

    def uncond_text(self, pipe: Any) -> dict[str, Tensor]:
        """Zeros (embeddings and pooled) when the pipeline has `force_zeros_for_empty_prompt` (SDXL base does), as
        it samples; else the empty prompt's conditioning."""
        empty = self.encode_text(pipe, [""])
        if pipe.config.get("force_zeros_for_empty_prompt", False):
            return {k: torch.zeros_like(v) for k, v in empty.items()}
        return empty

    def image_cond(self, sizes: Sequence[tuple[tuple[int, int], tuple[int, int]]], resolution: int) -> dict[str, Tensor]:
        """SDXL's micro-conditioning rows: (orig h, orig w, crop top, crop left, target h, target w)."""
        return {"time_ids": torch.stack([time_ids(o, c, resolution) for o, c in sizes])}

    def _mean_std(self, pipe: Any, z: Tensor) -> tuple[Tensor, Tensor] | None:
        cfg = pipe.vae.config
        mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
        if mean is None or std is None:
            return None
        shape = (1, -1) + (1,) * (z.ndim - 2)
        return torch.tensor(mean).view(shape), torch.tensor(std).view(shape)

    def to_latent_space(self, pipe: Any, z: Tensor) -> Tensor:
        """`(z - mean) * scaling_factor / std` when the VAE has `latents_mean`/`latents_std` (as SDXL's img2img
        encodes), else `scaling_factor * z`."""
        ms = self._mean_std(pipe, z)
        if ms is None:
            return super().to_latent_space(pipe, z)
        return (z - ms[0]) * pipe.vae.config.scaling_factor / ms[1]

    def from_latent_space(self, pipe: Any, z: Tensor) -> Tensor:
        ms = self._mean_std(pipe, z)
        if ms is None:
            return super().from_latent_space(pipe, z)
        return z * ms[1] / pipe.vae.config.scaling_factor + ms[0]

    def cache_identity(self, pipe: Any) -> dict[str, Any]:
        return {"sdxl": True}


def time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int], target: int) -> Tensor:
    """SDXL's micro-conditioning row: (orig h, orig w, crop top, crop left, target h, target w)."""
    return torch.tensor([*original_size, *crop_top_left, target, target], dtype=torch.float32)
