"""A small CNN digits classifier whose penultimate features define the Fréchet distance (FD) of the
digits benchmark, the way Inception features define FID for natural images."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DigitsClassifier(nn.Module):
    """conv(16) -> conv(32, /2) -> conv(64, /2) -> global pool -> feature_dim -> logits."""

    def __init__(self, num_classes: int = 10, channels: int = 1, feature_dim: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1), nn.SiLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(64, feature_dim), nn.SiLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class FeatureExtractor(nn.Module):
    """The classifier's features as torchmetrics' FID custom `feature` module (float images in)."""

    def __init__(self, classifier: DigitsClassifier) -> None:
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.num_features = classifier.feature_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier.features(x.float())


def train_classifier(x: Tensor, y: Tensor, steps: int = 600, batch_size: int = 128, lr: float = 2e-3,
                     seed: int = 0, num_classes: int = 10, progress: bool = False) -> DigitsClassifier:
    """Adam on random mini-batches with small random shifts (±1 px) so that features do not depend on
    exact pixel positions that a generator may miss by a pixel."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = DigitsClassifier(num_classes=num_classes, channels=x.shape[1])
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in tqdm(range(steps), desc="digits classifier", disable=not progress, leave=False):
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=gen)
        xb = x[idx]
        dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
        xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
        loss = F.cross_entropy(net(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def accuracy(net: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    net.eval()
    hits = sum(int((net(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
               for i in range(0, x.shape[0], batch_size))
    return hits / max(1, x.shape[0])
