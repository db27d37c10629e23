"""Image + caption sources for text-to-image distillation, and prompt files.

A local folder holds images (.png/.jpg/.jpeg/.webp) each with a same-named .txt caption
(`cat.png` + `cat.txt`), the layout most fine-tuning tools use. Images are centre-cropped and
resized to the training resolution and scaled to [-1, 1] for the VAE.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from proreflow.errors import ProReflowError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def find_pairs(root: str | Path) -> list[tuple[Path, str]]:
    """(image path, caption) for every image in `root` (recursively), sorted for determinism."""
    r = Path(root)
    if not r.is_dir():
        raise ProReflowError(f"image folder {str(r)!r} does not exist")
    images = sorted(p for p in r.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ProReflowError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {str(r)!r}")
    missing = [p.name for p in images if not p.with_suffix(".txt").is_file()]
    if missing:
        raise ProReflowError(f"{len(missing)} image(s) in {str(r)!r} have no .txt caption, e.g. {missing[:3]}")
    return [(p, p.with_suffix(".txt").read_text().strip()) for p in images]


def load_image(path: Path, resolution: int) -> Tensor:
    """(3, resolution, resolution) in [-1, 1]: centre crop to a square, then resize."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            im = im.resize((resolution, resolution), Image.Resampling.BICUBIC)
            arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    except (UnidentifiedImageError, OSError) as exc:
        raise ProReflowError(f"cannot read image {str(path)!r}: {exc}") from None
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def read_prompts(path: str | Path) -> list[str]:
    """Non-empty lines of a text file."""
    p = Path(path)
    if not p.is_file():
        raise ProReflowError(f"prompt file {str(p)!r} does not exist")
    prompts = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ProReflowError(f"prompt file {str(p)!r} holds no prompts")
    return prompts
