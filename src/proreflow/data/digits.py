"""scikit-learn's handwritten digits (1797 8x8 images, 10 classes) as a small real-image benchmark.

Images are upsampled 8x8 -> 16x16 bilinearly (our choice over zero-padding: every pixel carries
signal, and a UNet with two down-sampling blocks gets a 4x4 bottleneck), scaled from [0, 16] to
[-1, 1], and split per class into train and held-out sets with a seeded permutation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from proreflow.errors import ProReflowError

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # the "no label" class of classifier-free guidance


@dataclass
class DigitsData:
    train_x: Tensor  # (N, 1, S, S) in [-1, 1]
    train_y: Tensor  # (N,) int64
    test_x: Tensor
    test_y: Tensor

    @property
    def size(self) -> int:
        return self.train_x.shape[-1]


def load_digits_images(size: int = 16, test_fraction: float = 1 / 6, seed: int = 0) -> DigitsData:
    """The digits as (N, 1, size, size) tensors in [-1, 1] with a stratified held-out split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ProReflowError("the digits benchmark needs scikit-learn: pip install 'proreflow[metrics]'") from None
    if size < 8:
        raise ProReflowError(f"digits image size must be >= 8, got {size}")
    if not 0.0 < test_fraction < 1.0:
        raise ProReflowError(f"test_fraction must be in (0, 1), got {test_fraction}")
    raw = load_digits()
    x = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0 * 2.0 - 1.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(-1, 1)
    y = torch.tensor(raw.target, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    test_idx, train_idx = [], []
    for c in range(NUM_CLASSES):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_test = max(1, round(idx.numel() * test_fraction))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    tr, te = torch.cat(train_idx).sort().values, torch.cat(test_idx).sort().values
    return DigitsData(x[tr], y[tr], x[te], y[te])


def label_dropout(labels: Tensor, p: float, gen: torch.Generator) -> Tensor:
    """Replace each label by NULL_CLASS with probability p (trains the unconditional branch for CFG)."""
    if p <= 0:
        return labels
    drop = torch.rand(labels.shape, generator=gen) < p
    return torch.where(drop, torch.full_like(labels, NULL_CLASS), labels)


def class_cond(labels: Tensor) -> dict:
    """Conditioning dict of a class-conditional UNet2DModel, with the unconditional branch for CFG."""
    return {"class_labels": labels, "uncond": {"class_labels": torch.full_like(labels, NULL_CLASS)}}
