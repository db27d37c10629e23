"""Fashion-MNIST from Debian's `dataset-fashion-mnist` package as 32x32 RGB images with captions.

The files are the original IDX files (`{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`, 60k train / 10k test,
10 classes) under /usr/share/datasets/fashion-mnist (or $PROREFLOW_FASHION_MNIST). Images are padded 28 -> 32
with the black background and repeated to three channels; captions name the class in several phrasings, so a
text-to-image model learns the class from words. `write_image_folder` writes the set as images + same-stem .txt
captions, the layout `proreflow distill --data` reads (`proreflow.data.captions.find_pairs`).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import random
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from proreflow.errors import ProReflowError

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
SPLITS = {"train": "train", "test": "t10k"}
#: (singular with its article, plural) of each class, in label order
CLASS_PHRASES = (
    ("a t-shirt", "t-shirts"), ("a pair of trousers", "trousers"), ("a pullover", "pullovers"),
    ("a dress", "dresses"), ("a coat", "coats"), ("a sandal", "sandals"), ("a shirt", "shirts"),
    ("a sneaker", "sneakers"), ("a bag", "bags"), ("an ankle boot", "ankle boots"),
)
#: the class names (the noun a caption must contain); "shirt" is matched as a word, so "t-shirt" is class 0 only
CLASS_NAMES = ("t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
#: caption templates: {a} the singular with its article, {p} the plural
TEMPLATES = ("a photo of {a}", "{a}", "an image of {p}", "a picture of {a}", "{p}", "a product photo of {a}",
             "a black and white photo of {a}", "a small image of {a}")
NUM_CLASSES = len(CLASS_NAMES)


def fashion_dir() -> Path:
    return Path(os.environ.get("PROREFLOW_FASHION_MNIST", DEFAULT_DIR))


def fashion_files(root: str | Path | None = None) -> list[Path]:
    """The four IDX files, or one ProReflowError saying how to install them."""
    r = Path(root) if root is not None else fashion_dir()
    files = [r / f"{p}-{kind}-ubyte.gz" for p in SPLITS.values() for kind in ("images-idx3", "labels-idx1")]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ProReflowError(f"Fashion-MNIST is not installed: {', '.join(missing)} missing in {str(r)!r}; install it "
                             f"with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or set "
                             f"$PROREFLOW_FASHION_MNIST to a folder holding those files")
    return files


def fingerprint(root: str | Path | None = None) -> str:
    """sha256 over the four files (what a teacher trained on them is cached by)."""
    h = hashlib.sha256()
    for f in fashion_files(root):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _read_idx(path: Path, magic: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
        got, n = struct.unpack(">II", data[:8])
        if got != magic:
            raise ValueError(f"magic number {got}, expected {magic}")
        if magic == 2051:
            rows, cols = struct.unpack(">II", data[8:16])
            return np.frombuffer(data, np.uint8, offset=16).reshape(n, rows, cols)
        return np.frombuffer(data, np.uint8, offset=8).reshape(n)
    except (OSError, EOFError, ValueError, struct.error) as exc:
        raise ProReflowError(f"Fashion-MNIST file {str(path)!r} is damaged ({exc}); reinstall it with "
                             f"`apt-get install --reinstall dataset-fashion-mnist`") from None


@dataclass(frozen=True)
class FashionSplit:
    images: Tensor  # (N, 3, 32, 32) uint8
    labels: Tensor  # (N,) int64

    def pixels(self) -> Tensor:
        """Images as float in [-1, 1] (what the VAE and the classifier see)."""
        return self.images.float() / 127.5 - 1.0


def load_fashion(split: str = "train", root: str | Path | None = None, limit: int | None = None) -> FashionSplit:
    """One split as 32x32 RGB uint8 images (28x28 padded by 2 black pixels) and labels 0..9."""
    if split not in SPLITS:
        raise ProReflowError(f"Fashion-MNIST split must be one of {list(SPLITS)}, got {split!r}")
    fashion_files(root)
    r = Path(root) if root is not None else fashion_dir()
    x = _read_idx(r / f"{SPLITS[split]}-images-idx3-ubyte.gz", 2051)
    y = _read_idx(r / f"{SPLITS[split]}-labels-idx1-ubyte.gz", 2049)
    if x.shape[0] != y.shape[0]:
        raise ProReflowError(f"Fashion-MNIST {split}: {x.shape[0]} images but {y.shape[0]} labels; reinstall it")
    if limit is not None:
        x, y = x[:limit], y[:limit]
    imgs = torch.nn.functional.pad(torch.from_numpy(x.copy()), (2, 2, 2, 2))
    return FashionSplit(imgs[:, None].expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(y.astype(np.int64)))


def captions_for(label: int) -> list[str]:
    """Every phrasing of one class."""
    a, p = CLASS_PHRASES[label]
    return [t.format(a=a, p=p) for t in TEMPLATES]


def caption(label: int, rng: random.Random) -> str:
    return rng.choice(captions_for(label))


def class_of_caption(text: str, names: tuple[str, ...] = CLASS_NAMES) -> int | None:
    """The one class a caption names (by word, plural allowed), or None when it names none or several."""
    import re

    low = text.lower()
    found = set()
    for i, name in enumerate(names):
        if re.search(rf"(?<![\w-]){re.escape(name)}(es|s)?(?![\w-])", low):
            found.add(i)
    return found.pop() if len(found) == 1 else None


def write_image_folder(out: str | Path, split: str = "train", limit: int | None = None, seed: int = 0,
                       root: str | Path | None = None) -> int:
    """PNG images + same-stem .txt captions (one random phrasing each) under `out`; returns the count."""
    from PIL import Image

    data = load_fashion(split, root, limit)
    o = Path(out)
    o.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i, (img, label) in enumerate(zip(data.images, data.labels.tolist())):
        stem = o / f"{split}-{i:05d}"
        Image.fromarray(img[0].numpy(), mode="L").convert("RGB").save(stem.with_suffix(".png"))
        stem.with_suffix(".txt").write_text(caption(label, rng) + "\n", encoding="utf-8")
    return len(data.labels)
