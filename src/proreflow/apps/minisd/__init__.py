"""The mini Stable Diffusion teacher: `proreflow mini-teacher` trains an SD1.5-shaped latent text-to-image model on
CPU (Fashion-MNIST or your captioned images) and writes a diffusers StableDiffusionPipeline folder with the
classifier that scores it offline (docs/mini-sd.md)."""

from proreflow.apps.minisd.config import SD15_SCHEDULER, MiniSDConfig, load_minisd_config
from proreflow.apps.minisd.train import train_mini_teacher

__all__ = ["MiniSDConfig", "SD15_SCHEDULER", "load_minisd_config", "train_mini_teacher"]
