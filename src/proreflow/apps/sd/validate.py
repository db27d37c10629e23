"""What `distill --validate-every N` renders: fixed prompts from fixed noise, the EMA student at its step count
(one Euler step per window) over the teacher at 32 steps from the same noise, decoded by the pipeline's VAE.

Guidance 1 (the conditional prediction) for both, so the fidelity scalar is the RMSE (pixels in [0, 1]) between
what the student and its teacher make of the same noise and prompt, the quantity the mini Stable Diffusion
benchmarks report (docs/mini-sd.md). Nothing here draws from a global random stream."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from proreflow.apps.sd.encode import decode_latents, encode_prompts_only, encoders_on_device
from proreflow.cond import to_device
from proreflow.errors import ProReflowError
from proreflow.limits import MAX_PROMPTS
from proreflow.sampling import sample
from proreflow.solvers import VelocityField
from proreflow.training import Validation, image_grid, process_state
from proreflow.windows import WindowSchedule

#: used when neither --validation-prompts nor captions are at hand (streamed data)
DEFAULT_PROMPTS = ("a photograph of an astronaut riding a horse", "a red bicycle leaning against a brick wall",
                   "a bowl of fruit on a wooden table", "a lighthouse on a cliff at sunset")
#: the teacher's reference: this many Euler steps over the student's windows (8 per window for 4 windows)
TEACHER_STEPS = 32


def pick_prompts(given: list[str] | None, captions: list[str] | None, n: int = 4) -> list[str]:
    """--validation-prompts as given; else the first `n` distinct captions of the data (or prompts); else ours."""
    if given:
        if len(given) > MAX_PROMPTS:
            raise ProReflowError(f"--validation-prompts holds {len(given)} prompts; at most {MAX_PROMPTS} are rendered "
                                 f"(one row of images each validation)")
        return list(given)
    seen: list[str] = []
    for c in captions or []:
        if c not in seen:
            seen.append(c)
        if len(seen) == n:
            break
    return seen or list(DEFAULT_PROMPTS[:n])


def sd_validation(pipe: Any, teacher: VelocityField, schedule: WindowSchedule, prompts: list[str], resolution: int,
                  seed: int = 0) -> Validation:
    """Renders of the student on `schedule` (one step per window) and of the teacher at `TEACHER_STEPS`, both
    from the noise of generator `seed`, as images in [0, 1]; the picture is the student's row over the
    teacher's."""
    data = encode_prompts_only(pipe, prompts, resolution, "float32")
    device = process_state().device
    cond = to_device(data.cond, device)
    noise = torch.randn(len(prompts), *data.latent_shape, generator=torch.Generator().manual_seed(seed)).to(device)
    per_window = math.ceil(TEACHER_STEPS / schedule.num_windows)

    @torch.no_grad()
    def render(field: VelocityField | nn.Module, steps_per_window: int) -> Tensor:
        z = sample(field, noise, schedule, steps_per_window, cond=cond)
        with encoders_on_device(pipe):
            return decode_latents(pipe, z.float())

    reference = render(teacher, per_window)
    n = len(prompts)
    return Validation(render=lambda model: render(model, 1), reference=reference,
                      picture=lambda s, r: image_grid(torch.cat([s, r]), cols=n),
                      note=f"student {schedule.num_windows} steps over teacher {per_window * schedule.num_windows} "
                           f"steps, guidance 1, seed {seed}")
