"""Image + caption sources for text-to-image distillation, and prompt files.

Three sources give the same records (an image to open, its caption):
- a local folder of images (.png/.jpg/.jpeg/.webp) each with a same-named .txt caption
  (`cat.png` + `cat.txt`), the layout most fine-tuning tools use;
- webdataset-style tar shards (`key.jpg|png|...` + `key.txt` members), read with the stdlib
  `tarfile` so no extra dependency is needed: a .tar file, a folder of them, or a glob;
- an HF `datasets` dataset by hub name or `save_to_disk` folder (`hf:NAME[:SPLIT]`; optional
  dependency, imported only when used).
Images are centre-cropped and resized to the training resolution and scaled to [-1, 1] for the VAE;
`prepare_image` also reports the original size and the crop corner, which SDXL conditions on.
"""

from __future__ import annotations

import glob
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from proreflow.config import read_text_file
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
    return [(p, read_caption(p.with_suffix(".txt"))) for p in images]


def read_caption(path: Path) -> str:
    """A caption file's text (UTF-8), stripped."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as exc:
        raise ProReflowError(f"caption {str(path)!r} is not UTF-8 text (byte {exc.start}); "
                             f"re-save it as UTF-8") from None


def tar_shards(spec: str | Path) -> list[Path]:
    """The .tar files named by `spec`: one file, a folder holding them, or a glob pattern."""
    s = str(spec)
    p = Path(s)
    if p.is_dir():
        files = sorted(p.glob("*.tar"))
    elif any(c in s for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(s))
    else:
        files = [p] if p.is_file() else []
    if not files:
        raise ProReflowError(f"no .tar shards at {s!r}; pass a .tar file, a folder of .tar files or a glob")
    return files


class TarMember(bytes):
    """An image's bytes read from a tar shard, with where they came from (`where`), so that an undecodable image
    is named by its shard and member instead of as 'bytes'."""

    where: str = "a tar member"

    def __new__(cls, data: bytes, where: str = "a tar member") -> "TarMember":
        obj = super().__new__(cls, data)
        obj.where = where
        return obj

    def __reduce__(self):  # to DataLoader workers with its name (bytes' own pickling would drop it)
        return (TarMember, (bytes(self), self.where))


def _ends_as_tar(path: Path) -> bool:
    """Whether a tar file ends with the end-of-archive marker (two zero 512-byte blocks, which tar and Python's
    tarfile always write). Without it a shard cut at a member boundary reads as a shorter, valid archive."""
    size = path.stat().st_size
    if size < 1024:
        return False
    with open(path, "rb") as f:
        f.seek(size - 1024)
        return f.read(1024) == bytes(1024)


def read_tar_shards(spec: str | Path) -> list[tuple[bytes, str]]:
    """(image bytes, caption) for every `key.<image>` + `key.txt` pair in the shards, in shard order. A shard
    without the end-of-archive marker (cut short, e.g. by an interrupted copy) is refused, not read in part."""
    records: list[tuple[bytes, str]] = []
    for shard in tar_shards(spec):
        images: dict[str, bytes] = {}
        captions: dict[str, str] = {}
        try:
            with tarfile.open(shard) as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    key, dot, ext = m.name.rpartition(".")
                    if not dot:
                        continue
                    ext = "." + ext.lower()
                    if ext in IMAGE_SUFFIXES or ext == ".txt":
                        data = tar.extractfile(m).read()  # type: ignore[union-attr]
                        if ext == ".txt":
                            try:
                                captions[key] = data.decode("utf-8").strip()
                            except UnicodeDecodeError:
                                raise ProReflowError(f"caption {m.name!r} in tar shard {str(shard)!r} is not "
                                                     f"UTF-8 text; re-save it as UTF-8") from None
                        else:
                            images[key] = TarMember(data, f"{m.name} in {shard}")
        except (tarfile.TarError, OSError, EOFError) as exc:
            why = "not a tar archive" if isinstance(exc, tarfile.ReadError) else str(exc).splitlines()[0][:200]
            raise ProReflowError(f"cannot read tar shard {str(shard)!r}: {why}") from None
        if not _ends_as_tar(Path(shard)):
            raise ProReflowError(f"tar shard {str(shard)!r} ends without the end-of-archive marker: it was cut short "
                                 f"(an interrupted copy or download?); {len(images)} image(s) read before the cut. "
                                 f"Copy it again")
        missing = sorted(set(images) - set(captions))
        if missing:
            raise ProReflowError(f"{len(missing)} image(s) in shard {str(shard)!r} have no .txt member, "
                                 f"e.g. {missing[:3]}")
        records += [(images[k], captions[k]) for k in sorted(images)]
    if not records:
        raise ProReflowError(f"no image + .txt pairs in the tar shards at {str(spec)!r}")
    return records


@dataclass(frozen=True)
class DatasetImage:
    """A lazy reference to row `index`'s image of an HF dataset: decoded only when encoded, so a
    large dataset is not held in memory as images."""

    dataset: Any
    index: int
    column: str

    def load(self) -> Any:
        return self.dataset[self.index][self.column]

    def fingerprint(self) -> str:
        return f"{getattr(self.dataset, '_fingerprint', id(self.dataset))}|{self.index}|{self.column}"


def read_hf_dataset(dataset: Any, image_column: str = "image", caption_column: str = "text") -> list[tuple[Any, str]]:
    """(lazy image, caption) rows of an HF `datasets`-like object (`column_names`, `len`, row and column access)."""
    check_hf_columns(dataset, image_column, caption_column)
    captions = dataset[caption_column]  # strings only: the image column is not decoded here
    if len(captions) == 0:
        raise ProReflowError("the dataset is empty")
    return [(DatasetImage(dataset, i, image_column), str(c).strip()) for i, c in enumerate(captions)]


def check_hf_columns(dataset: Any, image_column: str = "image", caption_column: str = "text") -> None:
    """An HF data set (in memory or streamed) must have the image and caption columns it is read by."""
    cols = list(getattr(dataset, "column_names", []) or [])
    for name, what in ((image_column, "image"), (caption_column, "caption")):
        if name not in cols:
            raise ProReflowError(f"dataset has no {what} column {name!r} (columns: {cols}); "
                                 f"name it with {what}_column")


def import_datasets() -> Any:
    """The optional `datasets` package, or a clear error saying how to install it."""
    try:
        import datasets
    except ImportError:
        raise ProReflowError("HF datasets need the optional `datasets` package: pip install datasets") from None
    return datasets


def hf_spec(spec: str) -> tuple[str, str]:
    """`hf:NAME[:SPLIT]` -> (NAME, SPLIT), the split "train" when not given."""
    name, _, split = spec[3:].partition(":")
    return name, split or "train"


def is_saved_dataset(name: str) -> bool:
    """A folder written by `save_to_disk` (a Dataset or a DatasetDict), not a hub name or a data folder."""
    return Path(name).is_dir() and any((Path(name) / f).is_file() for f in ("dataset_dict.json", "state.json"))


def load_hf_dataset(name: str, split: str = "train") -> Any:
    """`datasets.load_from_disk(name)` for a saved folder, else `datasets.load_dataset(name, split=split)`."""
    datasets = import_datasets()
    try:
        if is_saved_dataset(name):
            saved = datasets.load_from_disk(name)
            return saved[split] if (Path(name) / "dataset_dict.json").is_file() else saved
        return datasets.load_dataset(name, split=split)
    except (OSError, ValueError, KeyError, FileNotFoundError) as exc:
        raise ProReflowError(f"cannot load the dataset {name!r} split {split!r}: "
                             f"{str(exc).splitlines()[0][:200]}") from None


def read_source(spec: str | Path) -> list[tuple[Any, str]]:
    """Records of a data spec: `hf:NAME[:SPLIT]`, tar shards (.tar file/folder/glob), or an image folder."""
    s = str(spec)
    if s.startswith("hf:"):
        return read_hf_dataset(load_hf_dataset(*hf_spec(s)))
    p = Path(s)
    if s.endswith(".tar") or any(c in s for c in "*?[") or (p.is_dir() and any(p.glob("*.tar"))):
        return read_tar_shards(s)
    return list(find_pairs(p))


@dataclass(frozen=True)
class PreparedImage:
    pixels: Tensor  # (3, resolution, resolution) in [-1, 1]
    original_size: tuple[int, int]  # (height, width) before cropping
    crop_top_left: tuple[int, int]  # crop corner in the resized image's pixels (SDXL's convention)


def _open(src: Any):
    from PIL import Image

    if isinstance(src, DatasetImage):
        src = src.load()
    if isinstance(src, Image.Image):
        return src.copy()
    if isinstance(src, (bytes, bytearray)):
        return Image.open(io.BytesIO(src))
    if isinstance(src, dict) and (src.get("bytes") or src.get("path")):  # datasets' undecoded Image feature
        return Image.open(io.BytesIO(src["bytes"])) if src.get("bytes") else Image.open(src["path"])
    return Image.open(src)


#: resize filters by name: bicubic (ours), lanczos (Rectified Diffusion's COCO scripts)
RESAMPLE = ("bicubic", "lanczos")


def centre_crop_resize(im: Any, resolution: int, resample: str = "bicubic") -> tuple[Any, tuple[int, int]]:
    """The largest centred square of a PIL image, resized to resolution² with `resample`, and the crop corner
    (top, left) in the resized image's pixels (SDXL's convention)."""
    from PIL import Image

    if resample not in RESAMPLE:
        raise ProReflowError(f"resize filter must be one of {list(RESAMPLE)}, got {resample!r}")
    w, h = im.size
    s = min(w, h)
    top, left = (h - s) // 2, (w - s) // 2
    im = im.crop((left, top, left + s, top + s)).resize(
        (resolution, resolution), Image.Resampling.LANCZOS if resample == "lanczos" else Image.Resampling.BICUBIC)
    scale = resolution / s
    return im, (round(top * scale), round(left * scale))


def prepare_image(src: Any, resolution: int) -> PreparedImage:
    """Centre crop to a square, resize, scale to [-1, 1]; `src` is a path, bytes or a PIL image."""
    from PIL import UnidentifiedImageError

    name = str(src) if isinstance(src, (str, Path)) else getattr(src, "where", None) or type(src).__name__
    try:
        with _open(src) as im:
            im = im.convert("RGB")
            w, h = im.size
            im, corner = centre_crop_resize(im, resolution)
            arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    except (UnidentifiedImageError, OSError) as exc:
        raise ProReflowError(f"cannot read image {name!r}: {exc}") from None
    return PreparedImage(torch.from_numpy(arr).permute(2, 0, 1).contiguous(), (h, w), corner)


def read_prompts(path: str | Path) -> list[str]:
    """Non-empty lines of a text file."""
    p = Path(path)
    text = read_text_file(p, "prompt file", "a text file, one prompt a line")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ProReflowError(f"prompt file {str(p)!r} holds no prompts")
    return prompts
