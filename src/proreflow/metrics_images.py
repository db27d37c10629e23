"""Image metrics for the paper's tables: FID and CLIP score through torchmetrics, with injectable networks.

The feature networks are objects handed to the metric code, so the tests run the same code with
small local networks: FID takes any module mapping uint8 images (N, 3, H, W) to (N, D) features
(the standard one is the TorchScript Inception `inception-2015-12-05.pt` that clean-fid and
StyleGAN2-ADA use, or torch-fidelity's when it is installed); CLIP score takes a transformers
CLIP model and processor loaded by name or path (`openai/clip-vit-large-patch14` by default).
Nothing here needs torchvision.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from proreflow.data.captions import IMAGE_SUFFIXES, centre_crop_resize
from proreflow.errors import ProReflowError

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + INCEPTION_FILE
INCEPTION_ENV = "PROREFLOW_INCEPTION"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"


def default_inception_dirs() -> list[Path]:
    """Where a downloaded `inception-2015-12-05.pt` is looked for, in order."""
    xdg = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    torch_home = Path(os.environ.get("TORCH_HOME", xdg / "torch"))
    return [xdg / "proreflow", torch_home / "hub" / "checkpoints"]


class TorchScriptInception(nn.Module):
    """The TorchScript Inception-v3 of the TF FID code: uint8 images of any size -> 2048-d pool features."""

    def __init__(self, net: torch.jit.ScriptModule, num_features: int) -> None:
        super().__init__()
        self.net = net
        self.num_features = num_features

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.net(images, return_features=True).float()


def load_inception(path: str | Path | None = None, search_dirs: Sequence[Path] | None = None,
                   allow_torch_fidelity: bool = True) -> nn.Module:
    """The standard FID feature network, from `path`, $PROREFLOW_INCEPTION, a cache dir or torch-fidelity.

    An explicit path (argument or env var) that does not hold the file is an error, never a silent fallback.
    """
    explicit = path if path is not None else os.environ.get(INCEPTION_ENV) or None
    if explicit is not None:
        p = Path(explicit)
        if p.is_dir():
            p = p / INCEPTION_FILE
        if not p.is_file():
            raise ProReflowError(f"Inception weights {str(p)!r} do not exist; download {INCEPTION_URL} "
                                 f"and pass its path (--inception PATH or ${INCEPTION_ENV})")
        return _load_torchscript(p)
    dirs = list(search_dirs) if search_dirs is not None else default_inception_dirs()
    for d in dirs:
        if (d / INCEPTION_FILE).is_file():
            return _load_torchscript(d / INCEPTION_FILE)
    if allow_torch_fidelity:
        try:
            import torch_fidelity  # noqa: F401
        except ImportError:
            pass
        else:
            return _torch_fidelity_inception()
    raise ProReflowError(
        f"Inception weights for FID are missing: no {INCEPTION_FILE} in {[str(d) for d in dirs]} and torch-fidelity "
        f"is not installed. Download {INCEPTION_URL} into {dirs[0] if dirs else '~/.cache/proreflow'}, or pass its "
        f"path with --inception PATH or ${INCEPTION_ENV}")


def _load_torchscript(p: Path) -> nn.Module:
    try:
        net = torch.jit.load(str(p), map_location="cpu").eval()
    except (RuntimeError, ValueError) as exc:
        raise ProReflowError(f"cannot load the TorchScript Inception {str(p)!r}: {str(exc).splitlines()[0][:200]}"
                             f"; download it again from {INCEPTION_URL}") from None
    try:  # probe once: the feature size, and that the file is the feature network we expect
        probe = net(torch.zeros(1, 3, 64, 64, dtype=torch.uint8), return_features=True)
    except Exception as exc:  # noqa: BLE001 - any failure means a wrong file
        raise ProReflowError(f"{str(p)!r} is not a TorchScript feature network taking (images, return_features=True): "
                             f"{str(exc).splitlines()[0][:200]}") from None
    if probe.ndim != 2 or probe.shape[0] != 1:
        raise ProReflowError(f"{str(p)!r} returned features of shape {tuple(probe.shape)}, expected (1, D)")
    return TorchScriptInception(net, int(probe.shape[1]))


def _torch_fidelity_inception() -> nn.Module:  # pragma: no cover - torch-fidelity is not installed in CI
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
    except Exception as exc:  # noqa: BLE001 - download failures come in many types
        raise ProReflowError(f"torch-fidelity could not load its Inception weights ({exc}); download {INCEPTION_URL} "
                             f"and pass --inception PATH instead") from None
    net.num_features = 2048
    return net


@dataclass
class FIDStats:
    """Mean and covariance of features over `n` images (what FID compares); saved as .npz or .safetensors."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    def save(self, path: str | Path) -> Path:
        from proreflow.store import atomic_save_tensors

        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix == ".safetensors":
            atomic_save_tensors({"mu": torch.from_numpy(self.mu), "sigma": torch.from_numpy(self.sigma),
                                 "n": torch.tensor([self.n])}, p)
        elif p.suffix == ".npz":
            tmp = p.with_name(f".{p.stem}.tmp.npz")
            np.savez(tmp, mu=self.mu, sigma=self.sigma, n=np.array(self.n))
            os.replace(tmp, p)
        else:
            raise ProReflowError(f"statistics file {str(p)!r} must end in .npz or .safetensors")
        return p

    @classmethod
    def load(cls, path: str | Path) -> "FIDStats":
        """Also reads clean-fid / pytorch-fid .npz files (keys mu, sigma; n defaults to 2 when absent)."""
        p = Path(path)
        if not p.is_file():
            raise ProReflowError(f"reference statistics {str(p)!r} do not exist")
        try:
            if p.suffix == ".safetensors":
                from safetensors.torch import load_file

                d = {k: v.numpy() for k, v in load_file(str(p)).items()}
            elif p.suffix == ".npz":
                with np.load(p, allow_pickle=False) as z:
                    d = {k: z[k] for k in z.files}
            else:
                raise ProReflowError(f"statistics file {str(p)!r} must end in .npz or .safetensors")
        except ProReflowError:
            raise
        except Exception as exc:  # noqa: BLE001 - corrupt files raise many types
            raise ProReflowError(f"cannot read reference statistics {str(p)!r}: {exc}") from None
        if "mu" not in d or "sigma" not in d:
            raise ProReflowError(f"reference statistics {str(p)!r} need arrays 'mu' and 'sigma', found {sorted(d)}")
        mu, sigma = np.asarray(d["mu"], np.float64).reshape(-1), np.asarray(d["sigma"], np.float64)
        if sigma.shape != (mu.size, mu.size):
            raise ProReflowError(f"reference statistics {str(p)!r}: sigma has shape {sigma.shape}, expected "
                                 f"({mu.size}, {mu.size})")
        n = int(np.asarray(d.get("n", 2)).reshape(-1)[0])
        return cls(mu, sigma, max(n, 2))


class _FixedDim(nn.Module):
    """Stands in for the feature network when torchmetrics only needs the feature size (statistics given)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - never called
        raise RuntimeError("features come from statistics")


def _fid_metric(extractor: nn.Module) -> Any:
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=extractor, reset_real_features=False)


@torch.no_grad()
def image_stats(extractor: nn.Module, batches: Iterable[Tensor], device: str | torch.device = "cpu") -> FIDStats:
    """Feature statistics of uint8 image batches, accumulated by torchmetrics' FID metric (float64)."""
    metric = _fid_metric(extractor).to(device)
    for b in batches:
        metric.update(b.to(device), real=True)
    n = int(metric.real_features_num_samples)
    if n < 2:
        raise ProReflowError(f"FID needs at least 2 images, got {n}")
    s, c = metric.real_features_sum.cpu(), metric.real_features_cov_sum.cpu()
    mu = s / n
    sigma = (c - n * torch.outer(mu, mu)) / (n - 1)  # the covariance torchmetrics' compute() uses
    return FIDStats(mu.numpy(), sigma.numpy(), n)


def frechet_distance(real: FIDStats, fake: FIDStats) -> float:
    """FID between two statistics, computed by torchmetrics' FrechetInceptionDistance.compute()."""
    if real.mu.shape != fake.mu.shape:
        raise ProReflowError(f"reference statistics have {real.mu.size} features but the feature network gives "
                             f"{fake.mu.size}; they were made with a different network")
    metric = _fid_metric(_FixedDim(real.mu.size))
    for prefix, st in (("real", real), ("fake", fake)):
        mu = torch.from_numpy(np.asarray(st.mu, np.float64))
        setattr(metric, f"{prefix}_features_sum", mu * st.n)
        setattr(metric, f"{prefix}_features_cov_sum",
                torch.from_numpy(np.asarray(st.sigma, np.float64)) * (st.n - 1) + st.n * torch.outer(mu, mu))
        setattr(metric, f"{prefix}_features_num_samples", torch.tensor(st.n))
    metric.orig_dtype = torch.float64
    with warnings.catch_warnings():  # states were set directly, so torchmetrics thinks update() never ran
        warnings.filterwarnings("ignore", message=".*compute.*called before.*update")
        return float(metric.compute())


def image_files(folder: str | Path) -> list[Path]:
    """Images in a folder (recursively), sorted."""
    r = Path(folder)
    if not r.is_dir():
        raise ProReflowError(f"reference image folder {str(r)!r} does not exist")
    files = sorted(p for p in r.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if len(files) < 2:
        raise ProReflowError(f"reference image folder {str(r)!r} holds {len(files)} image(s); FID needs at least 2")
    return files


def check_sizes(files: Sequence[Path], resolution: int, what: str = "reference image") -> None:
    """All images must be resolution x resolution (headers only are read)."""
    from PIL import Image, UnidentifiedImageError

    sizes: dict[tuple[int, int], Path] = {}
    for f in files:
        try:
            with Image.open(f) as im:
                sizes.setdefault(im.size, f)
        except (UnidentifiedImageError, OSError) as exc:
            raise ProReflowError(f"cannot read {what} {str(f)!r}: {exc}") from None
    wrong = {s: f for s, f in sizes.items() if s != (resolution, resolution)}
    if wrong:
        kinds = ", ".join(f"{w}x{h} (e.g. {str(f)!r})" for (w, h), f in list(wrong.items())[:3])
        mixed = "mixed sizes" if len(sizes) > 1 else "the wrong size"
        raise ProReflowError(f"{what}s have {mixed}: {kinds}; all must be {resolution}x{resolution} like the "
                             f"generated images. Resize them beforehand, or pass --ref-resize to centre-crop and "
                             f"resize them while reading")


def read_image_uint8(path: Path, resize_to: int | None = None, resample: str = "bicubic") -> Tensor:
    """(3, H, W) uint8; with `resize_to`, centre-cropped to a square and resized with `resample`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if resize_to is not None:
                im, _ = centre_crop_resize(im, resize_to, resample)
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise ProReflowError(f"cannot read image {str(path)!r}: {exc}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def image_batches(files: Sequence[Path], batch_size: int, resize_to: int | None = None,
                  progress: bool = False, desc: str = "features", resample: str = "bicubic") -> Iterable[Tensor]:
    """uint8 batches (N, 3, H, W) read lazily, with a progress bar."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(files), desc=desc, disable=not progress, unit="img")
    for i in range(0, len(files), batch_size):
        chunk = files[i:i + batch_size]
        batch = torch.stack([read_image_uint8(f, resize_to, resample) for f in chunk])
        bar.update(len(chunk))  # before the yield: a consumer that stops at the last batch still sees it counted
        if i + batch_size >= len(files):
            bar.close()
        yield batch


def load_clip(name_or_path: str = DEFAULT_CLIP) -> tuple[Any, Any]:
    """transformers CLIPModel + CLIPProcessor from a local folder, the HF cache or the hub."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(name_or_path).eval()
        processor = CLIPProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise ProReflowError(
            f"CLIP model {name_or_path!r} is not available ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}). "
            f"Download it once with network access (`huggingface-cli download {name_or_path}`; it is then read from "
            f"the HF cache, $HF_HOME), or pass a local folder with --clip-model PATH") from None
    return model, processor


class CLIPFeatures(nn.Module):
    """A CLIP model whose get_*_features return tensors (transformers >= 5 returns output objects,
    which torchmetrics 1.9's CLIPScore cannot normalise); the projected embeddings are unchanged."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out: Any) -> Tensor:
        return out if isinstance(out, Tensor) else out.pooler_output

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def clip_metric(model: Any, processor: Any) -> Any:
    """torchmetrics CLIPScore (mean of 100·cos(image, caption), floored at 0) around a loaded CLIP."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    wrapped = CLIPFeatures(model)
    return CLIPScore(model_name_or_path=lambda: (wrapped, processor))


@torch.no_grad()
def clip_score(metric: Any, batches: Iterable[tuple[Tensor, list[str]]]) -> float:
    """CLIP score over (uint8 images, captions) batches."""
    for images, captions in batches:
        metric.update(list(images), list(captions))
    return float(metric.compute())
