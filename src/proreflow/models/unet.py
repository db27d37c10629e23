"""Small class-conditional diffusers UNets for image benchmarks (digits): teacher and student share
the architecture, since the first stage's student starts as a copy of the teacher (docs/design.md §2)."""

from __future__ import annotations

from dataclasses import dataclass

from proreflow.errors import ProReflowError


#: bumped whenever class_unet builds a different network from the same UNetConfig, so that weights cached
#: by an earlier version are not loaded into it (2: `attention` also covers the mid block)
ARCH_VERSION = 2


@dataclass(frozen=True)
class UNetConfig:
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    # self-attention at the lowest resolution (the last down block, the first up block and the mid block);
    # off by default: slower on CPU, and under bf16 autocast its CPU backward was the slowest op of a step
    attention: bool = False
    norm_num_groups: int = 8

    def __post_init__(self) -> None:
        chans = tuple(self.block_out_channels)
        if self.norm_num_groups < 1:
            raise ProReflowError(f"norm_num_groups must be >= 1, got {self.norm_num_groups}")
        if not chans or any(c < 1 or c % self.norm_num_groups for c in chans):
            raise ProReflowError(f"block_out_channels {chans} must be positive multiples of norm_num_groups "
                                 f"{self.norm_num_groups}")
        if self.layers_per_block < 1:
            raise ProReflowError(f"layers_per_block must be >= 1, got {self.layers_per_block}")


def class_unet(cfg: UNetConfig, size: int, num_classes: int, channels: int = 1):
    """A UNet2DModel with a class embedding of num_classes + 1 entries (the last one: no label)."""
    from diffusers import UNet2DModel

    n = len(cfg.block_out_channels)
    if size % (2 ** (n - 1)):
        raise ProReflowError(f"image size {size} is not divisible by 2^{n - 1} for {n} UNet blocks")
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if cfg.attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels,
                       block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
                       down_block_types=tuple(down), up_block_types=tuple(up), num_class_embeds=num_classes + 1,
                       norm_num_groups=cfg.norm_num_groups, add_attention=cfg.attention)
