"""A distillation preset (configs/sd15-proreflow-*.yaml, sdxl-proreflow.yaml) as typed settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proreflow.config import PRESET_DIR, load_preset
from proreflow.errors import ProReflowError
from proreflow.fields import check_placement
from proreflow.limits import MAX_RESOLUTION
from proreflow.methods import MethodSpec
from proreflow.pairs import TeacherSolver
from proreflow.time_sampling import TimeSampling
from proreflow.training import RecipeSettings, TrainConfig


#: the preset every distillation config starts from: a partial user YAML changes only the keys it names
DEFAULT_PRESET = PRESET_DIR / "sd15-proreflow-I.yaml"


@dataclass(frozen=True)
class DistillConfig(RecipeSettings):
    """A distillation preset (configs/sd15-proreflow-*.yaml, sdxl-proreflow.yaml): the recipe settings and the
    teacher, data and weights settings. The defaults are those of `DEFAULT_PRESET` (tested)."""

    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    resolution: int = 512
    steps: int = 4
    method: MethodSpec = field(default_factory=lambda: MethodSpec("proreflow", windows="8->k", lam=1.0))
    budget_steps: int = 4000
    time_sampling: TimeSampling = field(default_factory=lambda: TimeSampling("mixture", 0.5))
    teacher_solver: TeacherSolver = field(default_factory=lambda: TeacherSolver("euler", 32, "placed"))
    # windows uniform in the teacher's timesteps (PeRFlow's: 4 windows start at 999/749/499/249 for SD1.5) or
    # in our flow time (999/674/354/96); the exported scheduler samples the placement the student trained on
    window_placement: str = "timesteps"
    teacher_guidance: float = 1.0
    caption_dropout: float = 0.1
    lora_rank: int = 0
    lora_alpha: float | None = None
    gradient_checkpointing: bool = True
    weights_dtype: str = "float32"  # frozen weights only (teacher copy, LoRA base); trained ones are float32
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        lr=8e-5, batch_size=1024, per_device_batch=16, warmup_steps=1000, weight_decay=1e-5, ema_decay=0.999,
        mixed_precision="bf16", grad_clip=1.0))

    def __post_init__(self) -> None:
        checks = [
            (8 <= self.resolution <= MAX_RESOLUTION and self.resolution % 8 == 0,
             f"resolution must be a multiple of 8 in [8, {MAX_RESOLUTION}], got {self.resolution}"),
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (0.0 <= self.caption_dropout < 1.0, f"caption_dropout must be in [0, 1), got {self.caption_dropout}"),
            (self.lora_rank >= 0, f"lora_rank must be >= 0 (0: full fine-tuning), got {self.lora_rank}"),
            (self.teacher_guidance >= 1.0, f"teacher_guidance must be >= 1, got {self.teacher_guidance}"),
            (self.weights_dtype in ("float32", "float16", "bfloat16"),
             f"weights_dtype must be float32, float16 or bfloat16, got {self.weights_dtype!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ProReflowError(msg)
        check_placement(self.window_placement)
        self.recipe(self.method).plan(self.steps)  # windows must fit the step count


def load_distill_config(path: str | Path | None = None, **overrides: Any) -> DistillConfig:
    """A preset (name in configs/ or a YAML path) over `DEFAULT_PRESET`, with CLI overrides on top."""
    return load_preset(DistillConfig, DEFAULT_PRESET, path, overrides, where="distill config")
