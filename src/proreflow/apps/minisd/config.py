"""The mini Stable Diffusion teacher preset (configs/mini-sd.yaml) as typed settings, checked when read."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from proreflow.config import PRESET_DIR, load_preset
from proreflow.errors import ProReflowError

#: SD1.5's scheduler/scheduler_config.json (runwayml/stable-diffusion-v1-5), as shipped: the schedule the UNet
#: is trained on (DDPM eps objective on these betas) and the scheduler the exported pipeline carries
SD15_SCHEDULER: dict[str, Any] = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None, "clip_sample": False,
}


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ProReflowError(msg)


@dataclass(frozen=True)
class DataSettings:
    resolution: int = 32  # pixels; Fashion-MNIST's 28x28 are padded to 32x32
    limit: int | None = None  # use only the first N training images (tests, quick looks)

    def __post_init__(self) -> None:
        _check(self.resolution >= 8 and self.resolution % 8 == 0, f"data.resolution must be a multiple of 8, got "
                                                                   f"{self.resolution}")
        _check(self.limit is None or self.limit >= 2, f"data.limit must be >= 2 or null, got {self.limit}")


@dataclass(frozen=True)
class VAESettings:
    """AutoencoderKL: downsampling factor 2**(len(block_out_channels) - 1), 4 latent channels (SD's)."""

    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = 1
    norm_num_groups: int = 16
    kl_weight: float = 1e-5  # per sample: loss = pixel MSE + kl_weight * KL(posterior | N(0, I)) summed over latents
    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3

    def __post_init__(self) -> None:
        _check(len(self.block_out_channels) >= 2 and all(c % self.norm_num_groups == 0 for c in self.block_out_channels),
               f"vae.block_out_channels needs >= 2 levels, each a multiple of norm_num_groups "
               f"{self.norm_num_groups}, got {self.block_out_channels}")
        _check(self.steps >= 1 and self.batch_size >= 1 and self.lr > 0 and self.kl_weight >= 0,
               "vae needs steps >= 1, batch_size >= 1, lr > 0 and kl_weight >= 0")


@dataclass(frozen=True)
class TextSettings:
    """A small CLIPTextModel, frozen at its random initialisation (the UNet learns to read it)."""

    hidden_size: int = 128
    layers: int = 2
    heads: int = 4
    intermediate_size: int = 256
    max_length: int = 16  # tokens, with the start and end tokens (SD1.5: 77)
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.hidden_size % self.heads == 0 and self.layers >= 1 and self.max_length >= 4,
               "text needs hidden_size divisible by heads, layers >= 1 and max_length >= 4")


@dataclass(frozen=True)
class UNetSettings:
    """UNet2DConditionModel predicting eps; cross-attention at the levels marked in `attention`."""

    block_out_channels: list[int] = field(default_factory=lambda: [96, 192, 192])
    attention: list[bool] = field(default_factory=lambda: [False, True, True])
    layers_per_block: int = 1
    attention_head_dim: int = 4  # diffusers' name; the number of heads per attention layer
    norm_num_groups: int = 32
    steps: int = 3000  # the defaults are configs/mini-sd.yaml's (what `load_minisd_config` starts from)
    batch_size: int = 64
    lr: float = 5e-4
    warmup_steps: int = 200
    ema_decay: float = 0.999
    caption_dropout: float = 0.1  # share of captions replaced by "" (for classifier-free guidance)

    def __post_init__(self) -> None:
        _check(len(self.attention) == len(self.block_out_channels),
               f"unet.attention needs one entry per level ({len(self.block_out_channels)}), got {self.attention}")
        _check(all(c % self.norm_num_groups == 0 for c in self.block_out_channels),
               f"unet.block_out_channels must be multiples of norm_num_groups {self.norm_num_groups}")
        _check(self.steps >= 1 and self.batch_size >= 1 and self.lr > 0 and 0 <= self.ema_decay < 1,
               "unet needs steps >= 1, batch_size >= 1, lr > 0 and ema_decay in [0, 1)")
        _check(0 <= self.caption_dropout < 1, f"unet.caption_dropout must be in [0, 1), got {self.caption_dropout}")


@dataclass(frozen=True)
class ClassifierSettings:
    """The classifier whose features define the offline FD and whose labels define prompt accuracy."""

    steps: int = 3500
    batch_size: int = 128
    lr: float = 2e-3

    def __post_init__(self) -> None:
        _check(self.steps >= 1 and self.batch_size >= 1 and self.lr > 0,
               "classifier needs steps >= 1, batch_size >= 1 and lr > 0")


@dataclass(frozen=True)
class MiniSDConfig:
    data: DataSettings = field(default_factory=DataSettings)
    vae: VAESettings = field(default_factory=VAESettings)
    text: TextSettings = field(default_factory=TextSettings)
    unet: UNetSettings = field(default_factory=UNetSettings)
    classifier: ClassifierSettings = field(default_factory=ClassifierSettings)
    mixed_precision: Literal["no", "bf16"] = "bf16"  # autocast for the VAE and UNet forward passes
    seed: int = 0
    checkpoint_every: int = 250
    threads: int | None = 2  # torch threads (null: torch's default)

    def __post_init__(self) -> None:
        _check(self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}")

    @property
    def latent_size(self) -> int:
        return self.data.resolution // 2 ** (len(self.vae.block_out_channels) - 1)


DEFAULT_PRESET = PRESET_DIR / "mini-sd.yaml"


def load_minisd_config(path: str | Path | None = None, **overrides: Any) -> MiniSDConfig:
    """The packaged mini-sd preset, then a user YAML (only the keys it changes), then overrides."""
    return load_preset(MiniSDConfig, DEFAULT_PRESET, path, overrides, where="mini-sd config")
