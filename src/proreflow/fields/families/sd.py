"""Stable Diffusion 1.x / 2.x: a UNet on VAE latents, trained as a Gaussian diffusion (eps- or v-prediction), one
CLIP text encoder. Seen as our flow through `VPVelocity`; windows and the teacher grid sit at its timesteps."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from proreflow.fields.families import (BoundaryMap, TeacherFamily, check_placement, register, uniform_grid)
from proreflow.fields.vp import VPSchedule, VPVelocity, timestep_placement, trailing_grid
from proreflow.windows import WindowSchedule


class VPFamily(TeacherFamily):
    """What every VP (eps / v) UNet family shares: the field, the time axis and the exported scheduler."""

    def field(self, pipe: Any, network: nn.Module | None = None, guidance_scale: float = 1.0) -> nn.Module:
        return VPVelocity(network if network is not None else self.denoiser(pipe),
                          VPSchedule.from_scheduler(pipe.scheduler),
                          pipe.scheduler.config.get("prediction_type", "epsilon"), guidance_scale)

    def placement(self, pipe: Any, placement: str, resolution: int | None = None) -> BoundaryMap | None:
        """"timesteps": PeRFlow's windows uniform in the teacher's discrete timesteps (`timestep_placement`)."""
        check_placement(placement)
        return None if placement == "flow" else timestep_placement(VPSchedule.from_scheduler(pipe.scheduler))

    def teacher_grid(self, pipe: Any, placement: str, steps: int, resolution: int | None = None) -> tuple[float, ...]:
        """DDIM's trailing timesteps under "timesteps" (the paper's DDIM-32), else uniform in flow time."""
        check_placement(placement)
        if placement == "flow":
            return uniform_grid(steps)
        return trailing_grid(VPSchedule.from_scheduler(pipe.scheduler), steps)

    def student_scheduler(self, pipe: Any, windows: WindowSchedule, resolution: int | None = None) -> tuple[Any, str]:
        from proreflow.schedulers.proreflow import scheduler_for, stock_scheduler_for

        k = windows.num_windows
        stock = stock_scheduler_for(pipe.scheduler.config, windows)
        if stock is not None:
            return stock, (f"DDIMScheduler (stock diffusers, timestep_spacing='trailing', set_alpha_to_one=True): the "
                           f"{k} windows start at the teacher's timesteps, where DDIM steps in {k} steps, and one "
                           f"Euler step per window is one DDIM step; the folder loads without proreflow")
        return (scheduler_for(pipe.scheduler.config, windows),
                f"ProReflowScheduler: the {k} windows ({', '.join(f'{b:.4g}' for b in windows.boundaries)}) are "
                f"not where any stock scheduler steps (window_placement: timesteps would be); diffusers loads it "
                f"once `proreflow.apps.sd.export` is imported")


@register
class SD(VPFamily):
    name = "sd"
    pipeline_classes = ("StableDiffusionPipeline",)

    @torch.no_grad()
    def encode_text(self, pipe: Any, prompts: list[str], batch: int = 64) -> dict[str, Tensor]:
        """The text encoder's last hidden states, as `StableDiffusionPipeline.encode_prompt` computes them."""
        tok, enc = pipe.tokenizer, pipe.text_encoder
        states = []
        for i in range(0, len(prompts), batch):
            ids = tok(prompts[i:i + batch], padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(enc.device)
            states.append(enc(ids)[0].float().cpu())
        return {"encoder_hidden_states": torch.cat(states)}
