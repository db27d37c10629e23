"""Offline stand-ins for FID and CLIP score on a labelled image set: a classifier trained on the same images.

- Fréchet distance (FD) on the classifier's penultimate features, computed exactly as FID is (torchmetrics'
  FID with the classifier as its feature module; `metrics.FrechetDistance`), to a held-out real set;
- prompt accuracy: the share of generated images the classifier puts in the class their prompt names (what a
  CLIP score measures, text-image agreement, for a closed set of classes).

A classifier folder holds `model.safetensors` and `config.json` (architecture, class names, image size, value
range), so `load_classifier(path)` needs nothing else, and `features.pt`, the same network as a TorchScript file
with the interface of the Inception FID file (`proreflow evaluate --inception .../features.pt` gives the classifier
FD); `proreflow mini-teacher` writes one next to its pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from proreflow.data.fashion import class_of_caption
from proreflow.errors import ProReflowError
from proreflow.models.classifier import DigitsClassifier, FeatureExtractor

WEIGHTS, CONFIG, TORCHSCRIPT = "model.safetensors", "config.json", "features.pt"
ARCHITECTURE = "proreflow.DigitsClassifier"


def save_classifier(net: DigitsClassifier, folder: str | Path, class_names: Sequence[str], image_size: int,
                    **info: object) -> Path:
    """Weights (safetensors) and a JSON config, each written atomically; `info` is kept in the config."""
    from proreflow.store import atomic_save_tensors, atomic_write_text

    f = Path(folder)
    atomic_save_tensors(net.state_dict(), f / WEIGHTS)
    channels = net.body[0].in_channels
    config = {"architecture": ARCHITECTURE, "num_classes": len(class_names), "channels": channels,
              "feature_dim": net.feature_dim, "image_size": image_size, "class_names": list(class_names),
              "value_range": [-1.0, 1.0], **info}
    atomic_write_text(f / CONFIG, json.dumps(config, indent=1) + "\n")
    export_torchscript(net, image_size, f / TORCHSCRIPT)
    return f


class _UInt8Features(torch.nn.Module):
    """The classifier behind the interface of the TorchScript Inception FID files: uint8 images (N, 3, H, W) of any
    size in, features (`return_features=True`) or logits out."""

    def __init__(self, net: DigitsClassifier, size: int) -> None:
        super().__init__()
        self.net, self.size = net.eval(), size

    def forward(self, images: Tensor, return_features: bool = False) -> Tensor:
        x = images.float() / 127.5 - 1.0
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=[self.size, self.size], mode="bilinear", align_corners=False, antialias=True)
        return self.net.features(x) if return_features else self.net(x)


def export_torchscript(net: DigitsClassifier, image_size: int, path: str | Path) -> Path:
    """The classifier as a TorchScript feature network that `metrics_images.load_inception(path)` loads, so
    `proreflow evaluate --inception PATH` computes the classifier FD instead of FID."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp")
    import warnings

    with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format the Inception FID file uses
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(_UInt8Features(net, image_size)), str(tmp))
    tmp.replace(p)
    return p


def load_classifier(folder: str | Path) -> tuple[DigitsClassifier, dict]:
    """The classifier a `save_classifier` folder holds, in eval mode, and its config."""
    from safetensors.torch import load_file

    from proreflow.store import read_json_object

    f = Path(folder)
    if not f.is_dir():
        raise ProReflowError(f"classifier folder {str(f)!r} does not exist (a `proreflow mini-teacher` output has "
                             f"one under classifier/)")
    cfg = read_json_object(f / CONFIG, "classifier config", "rewrite it with `proreflow mini-teacher`")
    if cfg.get("architecture") != ARCHITECTURE:
        raise ProReflowError(f"classifier {str(f)!r} has architecture {cfg.get('architecture')!r}, expected "
                             f"{ARCHITECTURE!r}")
    net = DigitsClassifier(num_classes=int(cfg["num_classes"]), channels=int(cfg["channels"]),
                           feature_dim=int(cfg["feature_dim"]))
    if not (f / WEIGHTS).is_file():
        raise ProReflowError(f"classifier weights {str(f / WEIGHTS)!r} are missing")
    try:
        net.load_state_dict(load_file(str(f / WEIGHTS)))
    except Exception as exc:  # noqa: BLE001 - a damaged file or mismatched tensors
        raise ProReflowError(f"classifier weights in {str(f)!r} do not match its config.json "
                             f"({str(exc).splitlines()[0][:200]})") from None
    return net.eval().requires_grad_(False), cfg


def to_classifier_input(images: Tensor, size: int, value_range: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """Images as the classifier reads them: float in [-1, 1], (N, 3, size, size). uint8 images are read as
    0..255; float images as `value_range` (a diffusers pipeline's output_type="pt" gives [0, 1])."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ProReflowError(f"images must be (N, 1 or 3, H, W), got {tuple(images.shape)}")
    lo, hi = (0.0, 255.0) if images.dtype == torch.uint8 else value_range
    x = (images.float() - lo) / (hi - lo) * 2 - 1
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(-1, 1)


class ClassifierMetrics:
    """FD to a real set on the classifier's features, and prompt accuracy, for generated images in [-1, 1]."""

    def __init__(self, classifier: DigitsClassifier, config: dict, real: Tensor | None = None) -> None:
        self.net, self.config = classifier.eval(), config
        self.class_names = tuple(config["class_names"])
        self.size = int(config["image_size"])
        self._fd = None
        if real is not None:
            from proreflow.metrics import FrechetDistance

            self._fd = FrechetDistance(FeatureExtractor(self.net), real)

    @classmethod
    def load(cls, folder: str | Path, real: Tensor | None = None) -> "ClassifierMetrics":
        return cls(*load_classifier(folder), real=real)

    def fd(self, images: Tensor) -> float:
        if self._fd is None:
            raise ProReflowError("FD needs a real image set: pass real= when making ClassifierMetrics")
        return self._fd(images.clamp(-1, 1))

    @torch.no_grad()
    def predict(self, images: Tensor, batch_size: int = 500) -> Tensor:
        return torch.cat([self.net(images[i:i + batch_size].float()).argmax(1)
                          for i in range(0, images.shape[0], batch_size)])

    def prompt_classes(self, prompts: Sequence[str]) -> Tensor:
        """The class each prompt names (-1 where it names none or several of the class names)."""
        return torch.tensor([-1 if (c := class_of_caption(p, self.class_names)) is None else c for p in prompts])

    def prompt_accuracy(self, images: Tensor, prompts: Sequence[str]) -> float:
        """Share of images, among those whose prompt names one class, that the classifier puts in that class."""
        want = self.prompt_classes(prompts)
        keep = want >= 0
        if not bool(keep.any()):
            raise ProReflowError(f"no prompt names one of the classifier's classes {list(self.class_names)}")
        return float((self.predict(images[keep]) == want[keep]).float().mean())

    def accuracy(self, images: Tensor, labels: Tensor) -> float:
        return float((self.predict(images) == labels).float().mean())
