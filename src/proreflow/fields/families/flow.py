"""What flow-matching teachers share (SD3/SD3.5 and their kin): a network that predicts our velocity at sigma =
flow time, `FlowMatchEulerDiscreteScheduler`, and its time shift.

The shift. Such a scheduler trains and samples at sigma = f(s) with f(s) = shift * s / (1 + (shift - 1) s) over
s uniform in (0, 1] (`scheduler.sigmas` is f(1 - i/T)); with `use_dynamic_shifting` the shift is exp(mu)
("exponential") or mu ("linear"), mu from the image's token count (`calculate_shift`). Under `window_placement:
timesteps` the K windows start at f(1 - j/K), entries j T/K of that table, where the teacher's own steps are
dense, as PeRFlow places a VP teacher's windows at its timesteps; the teacher's grid is f(1 - j/N). Under "flow"
both are uniform in sigma."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from proreflow.errors import ProReflowError
from proreflow.fields.families import BoundaryMap, TeacherFamily, check_placement, uniform_grid
from proreflow.fields.network import FlowVelocity
from proreflow.windows import WindowSchedule


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:
    """mu of a dynamic time shift, linear in the image's token count (the rule of diffusers' SD3 and FLUX
    pipelines, `calculate_shift`; tested against theirs)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


def shift_map(shift: float) -> BoundaryMap:
    """u -> shift * u / (1 + (shift - 1) u): the scheduler's sigma at uniform time u (1 at 1, 0 at 0)."""
    return lambda u: shift * u / (1.0 + (shift - 1.0) * u)


class FlowFamily(TeacherFamily):
    """A flow-matching teacher family; subclasses give its text encoding and `image_seq_len`."""

    denoiser_name = "transformer"
    lora_key = "transformer_lora_layers"
    has_safety_checker = False

    def field(self, pipe: Any, network: nn.Module | None = None, guidance_scale: float = 1.0) -> nn.Module:
        return FlowVelocity.from_scheduler(network if network is not None else self.denoiser(pipe), pipe.scheduler,
                                           guidance_scale)

    def prompt_embeds(self, pipe: Any, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """(text states, pooled projection) of `prompts` by the pipeline's own `encode_prompt`."""
        raise NotImplementedError

    @torch.no_grad()
    def encode_text(self, pipe: Any, prompts: list[str], batch: int = 64) -> dict[str, Tensor]:
        """`prompt_embeds` in batches of `batch`, kept on the CPU in float32."""
        states, pooled = [], []
        for i in range(0, len(prompts), batch):
            embeds, pool = self.prompt_embeds(pipe, prompts[i:i + batch])
            states.append(embeds.float().cpu())
            pooled.append(pool.float().cpu())
        return {"encoder_hidden_states": torch.cat(states), "pooled_projections": torch.cat(pooled)}

    def image_seq_len(self, pipe: Any, resolution: int) -> int:
        """The token count the pipeline computes mu from at this resolution."""
        raise NotImplementedError

    def shift(self, pipe: Any, resolution: int | None = None) -> float:
        """The effective static shift of the teacher's scheduler at `resolution` (needed when it shifts
        dynamically)."""
        cfg = pipe.scheduler.config
        if not cfg.get("use_dynamic_shifting", False):
            return float(cfg.get("shift", 1.0))
        if resolution is None:
            raise ProReflowError(f"{type(pipe.scheduler).__name__} shifts its sigmas by the image size "
                                 "(use_dynamic_shifting); the training resolution is needed to place the windows")
        mu = calculate_shift(self.image_seq_len(pipe, resolution), cfg.get("base_image_seq_len", 256),
                             cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                             cfg.get("max_shift", 1.15))
        return math.exp(mu) if cfg.get("time_shift_type", "exponential") == "exponential" else mu

    def placement(self, pipe: Any, placement: str, resolution: int | None = None) -> BoundaryMap | None:
        check_placement(placement)
        if placement == "flow":
            return None
        s = self.shift(pipe, resolution)
        return None if s == 1.0 else shift_map(s)

    def teacher_grid(self, pipe: Any, placement: str, steps: int, resolution: int | None = None) -> tuple[float, ...]:
        grid = uniform_grid(steps)
        f = self.placement(pipe, placement, resolution)
        return grid if f is None else tuple(f(u) for u in grid)

    def to_latent_space(self, pipe: Any, z: Tensor) -> Tensor:
        """`(z - shift_factor) * scaling_factor`: the pipeline decodes z / scaling_factor + shift_factor."""
        cfg = pipe.vae.config
        return (z - (cfg.get("shift_factor") or 0.0)) * cfg.scaling_factor

    def from_latent_space(self, pipe: Any, z: Tensor) -> Tensor:
        cfg = pipe.vae.config
        return z / cfg.scaling_factor + (cfg.get("shift_factor") or 0.0)

    def pipeline_sigmas(self, scheduler: Any, k: int) -> list[float]:
        """The sigmas a scheduler steps at when the family's pipeline samples K steps (SD3: `set_timesteps(K)`)."""
        scheduler.set_timesteps(k)
        return scheduler.sigmas.tolist()

    def stock_overrides(self, s: float, windows: WindowSchedule) -> list[dict]:
        """Stock settings to try for a student with these windows, at shift `s`: `shift_terminal` = the last
        window's start stretches the K sigmas to end there. Unshifted (s = 1) they are then the K windows uniform
        in sigma; at the teacher's shift they equal windows placed at it for K <= 2 only."""
        k = windows.num_windows
        return [dict(shift=s, use_dynamic_shifting=False, shift_terminal=windows.boundaries[-2] if k > 1 else None)]

    def stock_scheduler(self, pipe: Any, windows: WindowSchedule, resolution: int | None = None) -> Any | None:
        """diffusers' own FlowMatchEulerDiscreteScheduler when one of `stock_overrides` steps exactly at the K
        windows, checked by calling it as the family's pipeline does (`pipeline_sigmas`); else None. Windows at the
        teacher's shift are tried with it, any others unshifted. Exact at K steps only."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        k, s = windows.num_windows, self.shift(pipe, resolution)
        f = shift_map(s)
        placed = all(abs(b - f(1.0 - j / k)) <= 1e-9 for j, b in enumerate(windows.boundaries))
        keep = {k_: v for k_, v in dict(pipe.scheduler.config).items() if not k_.startswith("_")}
        off = dict(invert_sigmas=False, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
                   stochastic_sampling=False)
        for overrides in self.stock_overrides(s if placed else 1.0, windows):
            stock = FlowMatchEulerDiscreteScheduler.from_config({**keep, **off, **overrides})
            got = self.pipeline_sigmas(stock, k)
            if len(got) == k + 1 and all(abs(x - y) <= 1e-6 for x, y in zip(got, windows.boundaries)):
                return FlowMatchEulerDiscreteScheduler.from_config(stock.config)
        return None

    def student_scheduler(self, pipe: Any, windows: WindowSchedule, resolution: int | None = None) -> tuple[Any, str]:
        """Stock FlowMatchEuler where it steps exactly at the K windows (`stock_scheduler`), else our
        `ProReflowFlowScheduler`."""
        from proreflow.schedulers.proreflow import flow_scheduler_for

        k = windows.num_windows
        stock = self.stock_scheduler(pipe, windows, resolution)
        if stock is not None:
            c = stock.config
            terminal = "none" if c.shift_terminal is None else f"{c.shift_terminal:.4g}"
            return stock, (f"FlowMatchEulerDiscreteScheduler (stock diffusers, shift {c.shift:.4g}, shift_terminal "
                           f"{terminal}): its {k} sigmas are the {k} windows, one Euler step each; the "
                           f"folder loads without proreflow. Sample at {k} steps (at more, its sigmas no longer "
                           f"follow the windows; `proreflow sample` then uses ProReflowFlowScheduler)")
        return (flow_scheduler_for(pipe.scheduler.config, windows),
                f"ProReflowFlowScheduler: a flow-matching student's {k} windows in sigma "
                f"({', '.join(f'{b:.4g}' for b in windows.boundaries)}) are not where a stock scheduler steps; "
                f"diffusers loads it once `proreflow.apps.sd.export` is imported")
