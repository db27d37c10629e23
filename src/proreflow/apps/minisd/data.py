"""What the mini teacher trains on: Fashion-MNIST (captions in several phrasings, labels, the test split held
out), or a user's captioned images (`--data`, any source `proreflow distill` reads)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from proreflow.data import fashion
from proreflow.errors import ProReflowError


@dataclass
class TeacherData:
    images: Tensor  # (N, 3, R, R) uint8, training images
    captions: list[str]  # every distinct caption
    caption_ids: Tensor  # (N, T) long: the captions each image may take (one drawn per use)
    caption_counts: Tensor  # (N,) long: how many of its T columns are used
    labels: Tensor | None  # (N,) long, when every caption names one class
    class_names: tuple[str, ...]
    test_images: Tensor | None  # (M, 3, R, R) uint8 held out (FD reference), with labels
    test_labels: Tensor | None
    fingerprint: str
    source: str

    def pixels(self, idx: Tensor) -> Tensor:
        return self.images[idx].float() / 127.5 - 1.0


def _to_uint8(x: Tensor) -> Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def fashion_data(resolution: int, limit: int | None = None) -> TeacherData:
    train, test = fashion.load_fashion("train", limit=limit), fashion.load_fashion("test")
    imgs, timgs = train.images, test.images
    if resolution != 32:
        resize = lambda x: _to_uint8(torch.nn.functional.interpolate(  # noqa: E731
            x.float() / 127.5 - 1, size=(resolution, resolution), mode="bilinear", antialias=True))
        imgs, timgs = resize(imgs), resize(timgs)
    per_class = [fashion.captions_for(c) for c in range(fashion.NUM_CLASSES)]
    captions = [c for cs in per_class for c in cs]
    t = len(per_class[0])
    ids = train.labels[:, None] * t + torch.arange(t)[None]
    fp = hashlib.sha256(f"{fashion.fingerprint()}|{resolution}|{limit}|{captions}".encode()).hexdigest()
    return TeacherData(imgs, captions, ids, torch.full((imgs.shape[0],), t), train.labels, fashion.CLASS_NAMES,
                       timgs, test.labels, fp, "fashion-mnist")


def source_data(spec: str, resolution: int, limit: int | None = None, progress: bool = True) -> TeacherData:
    """A user's images + captions (`read_source`, `prepare_image`). When every caption names exactly one
    Fashion-MNIST class (a `write_image_folder` folder) the labels are kept, so the classifier metrics work,
    with every tenth image held out as the FD reference."""
    from proreflow.data.captions import prepare_image, read_source

    records = read_source(spec)
    if limit is not None:
        records = records[:limit]
    if len(records) < 2:
        raise ProReflowError(f"--data {spec!r} holds {len(records)} image(s); the teacher needs at least 2")
    imgs = torch.stack([_to_uint8(prepare_image(src, resolution).pixels)
                        for src, _ in tqdm(records, desc="reading --data", disable=not progress, leave=False)])
    texts = [c for _, c in records]
    captions = sorted(set(texts))
    index = {c: i for i, c in enumerate(captions)}
    ids = torch.tensor([[index[c]] for c in texts])
    h = hashlib.sha256(imgs.numpy().tobytes())
    h.update("\n".join(texts).encode())
    classes = [fashion.class_of_caption(c) for c in texts]
    labels = test_x = test_y = None
    if all(c is not None for c in classes) and len(set(classes)) > 1 and len(texts) >= 20:
        y = torch.tensor(classes)
        held = torch.arange(len(texts)) % 10 == 9
        test_x, test_y = imgs[held], y[held]
        imgs, ids, labels = imgs[~held], ids[~held], y[~held]
    return TeacherData(imgs, captions, ids, torch.ones(imgs.shape[0], dtype=torch.long), labels, fashion.CLASS_NAMES,
                       test_x, test_y, h.hexdigest(), str(spec))


def load_teacher_data(spec: str | None, resolution: int, limit: int | None = None,
                      progress: bool = True) -> TeacherData:
    if spec is None or spec == "fashion-mnist":
        return fashion_data(resolution, limit)
    return source_data(spec, resolution, limit, progress)
