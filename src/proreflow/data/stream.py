"""Streaming image + caption samples from webdataset tar shards, image folders or HF `datasets`: host memory
does not grow with the data set, and a resumed stream continues exactly where it stopped.

The order of an epoch is a function of the seed alone:
- the shards (tar files; an image folder is cut into shards of `folder_shard_size` images; an HF data set's
  own shards, i.e. its data files in streaming mode, or pieces of a `save_to_disk` folder) are permuted
  per epoch; rank r of R takes every R-th shard of that order and worker w of W every W-th of those, so no
  sample reaches two ranks;
- each shard's samples are shuffled per (seed, epoch, shard): a shuffle buffer of one shard, which bounds the
  memory by the largest shard;
- images are decoded, centre-cropped and resized in the DataLoader workers.

A worker's samples reach the consumer in the worker's order, so what has been consumed is, per worker, a
prefix: the shards it finished and how many samples of the current one. `state_dict()` holds exactly that
(plus the epoch); a stream built with it skips those samples (their bytes are read, their images not
decoded). Given every rank's position (`"ranks"`, which the training loop gathers into each checkpoint), a
stream split over another number of processes or workers continues the same epoch: the shards nobody
finished, each from its first unconsumed sample, are dealt out to the new ranks and workers
(`continue_split`), so within an epoch no sample is seen twice and none is skipped. Unreadable samples (a bad
image, a caption that is not UTF-8, a damaged tar member) are skipped and counted, never fatal. Tar members are
read with webdataset's iterators; HF shards with `datasets`' own streaming readers.
"""

from __future__ import annotations

import glob
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from proreflow.data.captions import (IMAGE_SUFFIXES, check_hf_columns, hf_spec, import_datasets,
                                     is_saved_dataset, load_hf_dataset, prepare_image)
from proreflow.errors import ProReflowError

#: an image folder is cut into shards of this many images (sorted by path)
FOLDER_SHARD_SIZE = 256


@dataclass(frozen=True)
class Shard:
    """A tar file, a slice of an image folder's sorted files, or one shard of an HF streaming data set (an
    `IterableDataset` whose image column is not decoded, and the names of its image and caption columns)."""

    name: str
    tar: Path | None = None
    files: tuple[Path, ...] = ()
    hf: tuple[Any, str, str] | None = field(default=None, compare=False)


def hf_shards(name: str, split: str = "train", folder_shard_size: int = FOLDER_SHARD_SIZE,
              image_column: str = "image", caption_column: str = "text") -> list[Shard]:
    """An HF data set as shards without loading it: a hub name or data folder is opened with
    `load_dataset(..., streaming=True)` (its shards are its data files); a `save_to_disk` folder is memory-mapped
    and cut into pieces of about `folder_shard_size` rows (`to_iterable_dataset`)."""
    datasets = import_datasets()
    try:
        if is_saved_dataset(name):
            table = load_hf_dataset(name, split)
            if len(table) == 0:
                raise ProReflowError(f"the dataset {name!r} split {split!r} is empty")
            ds = table.to_iterable_dataset(num_shards=min(len(table), -(-len(table) // folder_shard_size)))
        else:
            ds = datasets.load_dataset(name, split=split, streaming=True)
    except (OSError, ValueError, KeyError, FileNotFoundError) as exc:
        raise ProReflowError(f"cannot stream the dataset {name!r} split {split!r}: "
                             f"{str(exc).splitlines()[0][:200]}") from None
    check_hf_columns(ds, image_column, caption_column)
    ds = ds.cast_column(image_column, datasets.Image(decode=False))  # bytes to the workers, decoded there
    return [Shard(f"hf:{name}:{split}#{i}", hf=(ds.shard(num_shards=ds.n_shards, index=i), image_column, caption_column))
            for i in range(ds.n_shards)]


def find_shards(spec: str | Path, folder_shard_size: int = FOLDER_SHARD_SIZE) -> list[Shard]:
    """The shards of `spec`: `hf:NAME[:SPLIT]` (`hf_shards`), a .tar file, a glob of them, a folder of .tar
    files, or an image folder (each image with a same-named .txt caption)."""
    s = str(spec)
    if s.startswith("hf:"):
        name, split = hf_spec(s)
        return hf_shards(name, split, folder_shard_size)
    p = Path(s)
    if any(c in s for c in "*?["):
        tars = sorted(Path(f) for f in glob.glob(s))
    elif p.is_file():
        tars = [p]
    elif p.is_dir() and any(p.glob("*.tar")):
        tars = sorted(p.glob("*.tar"))
    elif p.is_dir():
        images = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise ProReflowError(f"no images ({', '.join(IMAGE_SUFFIXES)}) and no .tar shards in {s!r}")
        return [Shard(f"{s}#{i}", files=tuple(images[i:i + folder_shard_size]))
                for i in range(0, len(images), folder_shard_size)]
    else:
        tars = []
    if not tars:
        raise ProReflowError(f"no .tar shards or images at {s!r}; pass a .tar file, a glob, or a folder")
    return [Shard(str(t), tar=t) for t in tars]


def write_shards(records: list[tuple[bytes, str]], folder: str | Path, per_shard: int) -> list[Path]:
    """Webdataset tar shards (`shard-00000.tar`, ...) of (PNG/JPEG bytes, caption) records, `per_shard` each,
    with webdataset's writer: `<key>.png|jpg` + `<key>.txt` per sample."""
    from webdataset import TarWriter

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(0, len(records), per_shard):
        path = folder / f"shard-{i // per_shard:05d}.tar"
        with TarWriter(str(path)) as sink:
            for j, (image, caption) in enumerate(records[i:i + per_shard], start=i):
                ext = "jpg" if image[:3] == b"\xff\xd8\xff" else "png"
                sink.write({"__key__": f"sample{j:08d}", ext: image, "txt": caption})
        paths.append(path)
    return paths


#: an epoch's shards in the order they are dealt out: (index into the shard list, first sample to read)
Entries = list[tuple[int, int]]


@dataclass
class StreamState:
    """What a stream has handed out in its current epoch: per worker, shards finished and samples taken from
    the next one. Valid only for the same shards, seed, ranks and workers. `plans`: epochs whose entries are
    not the seed's permutation but what remained of them when the stream moved to another split."""

    epoch: int = 0
    workers: dict[int, list[int]] = field(default_factory=dict)  # worker -> [shards done, samples in the next]
    plans: dict[int, Entries] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "positions": {str(k): v for k, v in self.workers.items()},
                "plans": {str(e): [list(x) for x in p] for e, p in self.plans.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StreamState":
        try:
            return cls(int(d["epoch"]), {int(k): [int(v[0]), int(v[1])] for k, v in d["positions"].items()},
                       {int(e): [(int(i), int(o)) for i, o in p] for e, p in d.get("plans", {}).items()})
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise ProReflowError(f"a saved stream position is damaged ({type(exc).__name__})") from None

    def next_epoch(self) -> "StreamState":
        return StreamState(self.epoch + 1, {}, {e: p for e, p in self.plans.items() if e > self.epoch})


def epoch_entries(n_shards: int, seed: int, epoch: int, plans: dict[int, Entries]) -> Entries:
    """Every shard of `epoch` in dealing order: a plan's remainder, or the seed's permutation from sample 0."""
    if epoch in plans:
        return list(plans[epoch])
    order = torch.randperm(n_shards, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return [(i, 0) for i in order.tolist()]


def deal(entries: Entries, rank: int, world: int, worker: int, workers: int) -> Entries:
    """Rank r of R takes every R-th entry, worker w of W every W-th of those."""
    return entries[rank::world][worker::workers]


def continue_split(saved: list[dict[str, Any]], n_shards: int, seed: int) -> StreamState:
    """The state that continues, on any split, the epochs that the ranks of `saved` (one `state_dict()` per rank,
    in rank order) were in: for each epoch from the earliest rank's to the latest's, the shards not finished,
    in dealing order, each from its first unconsumed sample."""
    try:
        world, epochs = len(saved), [int(s["epoch"]) for s in saved]
        plans_before = StreamState.from_dict(saved[0]).plans  # the same on every rank
        positions = [StreamState.from_dict(s).workers for s in saved]
        workers = [int(s["workers"]) for s in saved]
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ProReflowError(f"a saved stream position is damaged ({type(exc).__name__})") from None
    plans: dict[int, Entries] = {}
    for epoch in range(min(epochs), max(epochs) + 1):
        entries = epoch_entries(n_shards, seed, epoch, plans_before)
        resume_at: dict[int, int | None] = {}  # shard -> first unconsumed sample; None: finished
        for rank in range(world):
            n_workers = max(workers[rank], 1)  # 0 DataLoader workers: the main process is worker 0 of 1
            for worker in range(n_workers):
                mine = deal(entries, rank, world, worker, n_workers)
                done, taken = ((len(mine), 0) if epochs[rank] > epoch else (0, 0) if epochs[rank] < epoch
                               else positions[rank].get(worker, [0, 0]))
                for pos, (shard, _) in enumerate(mine):
                    if pos < done:
                        resume_at[shard] = None
                    elif pos == done and taken:
                        resume_at[shard] = taken
        plans[epoch] = [(i, resume_at.get(i, first)) for i, first in entries if resume_at.get(i, first) is not None]
    return StreamState(min(epochs), {}, plans)


def _samples_of(shard: Shard, skipped: list[int]) -> list[tuple[str, Any, bytes | None]]:
    """(key, image source, caption bytes) of every sample in `shard`, in a fixed order; bad members counted."""
    if shard.hf is not None:
        ds, image_column, caption_column = shard.hf
        out = []
        try:  # in batches: iterating the rows directly would split the shard again over DataLoader workers
            rows = (row for batch in ds.iter(batch_size=256) for row in zip(batch[image_column], batch[caption_column]))
            for j, (image, caption) in enumerate(rows):
                if image is None or not isinstance(caption, str):
                    skipped[0] += 1
                    continue
                out.append((f"{shard.name}/{j:09d}", image, caption.encode("utf-8")))
        except Exception:  # an unreadable data file: the rest of the shard is skipped
            skipped[0] += 1
        return out
    if shard.tar is None:
        return [(str(f), f, None) for f in shard.files]
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    def skip(exc: Exception) -> bool:
        skipped[0] += 1
        return True

    out = []
    try:
        with open(shard.tar, "rb") as f:
            members = ({**m, "__url__": str(shard.tar)} for m in tar_file_iterator(f, handler=skip))
            for sample in group_by_keys(members, handler=skip):
                image = next((sample[k] for k in sample if "." + k in IMAGE_SUFFIXES), None)
                if image is None or "txt" not in sample:
                    skipped[0] += 1
                    continue
                out.append((sample["__key__"], image, sample["txt"]))
    except Exception:  # a shard that is not a tar archive at all: all of it is skipped
        skipped[0] += 1
    return sorted(out, key=lambda s: s[0])


class ImageCaptionStream(IterableDataset):
    """Samples {"pixels", "caption", "original_size", "crop_top_left"} of this rank's shards, in the epoch order
    of the module docstring, each tagged with (worker, shard position, index in shard) for `StreamIterator`."""

    def __init__(self, shards: list[Shard], resolution: int, seed: int, rank: int = 0, world: int = 1,
                 state: StreamState | None = None) -> None:
        self.shards, self.resolution, self.seed, self.rank, self.world = shards, resolution, seed, rank, world
        self.state = state or StreamState()

    def worker_shards(self, epoch: int, worker: int, workers: int) -> list[tuple[Shard, int]]:
        """This worker's (shard, first sample) of `epoch`."""
        entries = epoch_entries(len(self.shards), self.seed, epoch, self.state.plans)
        return [(self.shards[i], first) for i, first in deal(entries, self.rank, self.world, worker, workers)]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.state.epoch
        done, taken = self.state.workers.get(worker, [0, 0])
        for pos, (shard, first) in enumerate(self.worker_shards(epoch, worker, workers)):
            if pos < done:
                continue
            skipped = [0]
            samples = _samples_of(shard, skipped)
            gen = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}|{epoch}|{shard.name}".encode()))
            order = torch.randperm(len(samples), generator=gen).tolist()
            start = max(first, taken) if pos == done else first
            for j in range(start, len(samples)):
                key, image, caption = samples[order[j]]
                item = {"worker": worker, "shard": pos, "index": j, "last": j == len(samples) - 1, "skipped": 0}
                try:
                    text = caption.decode("utf-8").strip() if caption is not None else \
                        Path(image).with_suffix(".txt").read_text(encoding="utf-8").strip()
                    prepared = prepare_image(image, self.resolution)
                except (ProReflowError, OSError, UnicodeDecodeError):
                    item.update(skipped=1, pixels=None)
                    yield item
                    continue
                item.update(pixels=prepared.pixels, caption=text, original_size=prepared.original_size,
                            crop_top_left=prepared.crop_top_left, key=key)
                yield item
            if skipped[0]:  # members that never became samples: reported with the shard's last position
                yield {"worker": worker, "shard": pos, "index": len(samples), "last": True, "skipped": skipped[0],
                       "pixels": None}
            if not samples and not skipped[0]:
                yield {"worker": worker, "shard": pos, "index": 0, "last": True, "skipped": 0, "pixels": None}


def _collate(item: dict[str, Any]) -> dict[str, Any]:
    return item


class StreamIterator:
    """Endless samples of one rank: epochs one after another, the position kept for checkpoints, unreadable
    samples counted (`skipped`) and reported once per epoch."""

    def __init__(self, spec: str | Path, resolution: int, seed: int = 0, rank: int = 0, world: int = 1,
                 workers: int = 2, folder_shard_size: int = FOLDER_SHARD_SIZE) -> None:
        self.shards = find_shards(spec, folder_shard_size)
        if len(self.shards) < world:
            raise ProReflowError(f"{len(self.shards)} shard(s) for {world} processes: every process needs at least "
                                 f"one; use more (smaller) shards")
        self.resolution, self.seed, self.rank, self.world, self.workers = resolution, seed, rank, world, workers
        self.state = StreamState()
        self.skipped = 0  # unreadable samples passed over, over all epochs
        self.seen = 0  # samples handed out, over all epochs
        self._epoch_seen = 0
        self._it: Iterator[dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {**self.state.to_dict(), "shards": len(self.shards), "rank": self.rank, "world": self.world,
                "workers": self.workers, "seed": self.seed, "skipped": self.skipped, "seen": self.seen}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Continue from a saved position: this rank's own on the same split; on another split, the epoch's
        remainder from every rank's position (`d["ranks"]`); without those, the epoch restarts (said)."""
        mine = {"shards": len(self.shards), "rank": self.rank, "world": self.world, "workers": self.workers,
                "seed": self.seed}
        ranks = d.get("ranks")
        if {k: d.get(k) for k in mine} == mine:
            self.state = StreamState.from_dict(d)
        elif (isinstance(ranks, list) and ranks and all(isinstance(r, dict) for r in ranks)
              and [r.get("rank") for r in ranks] == list(range(len(ranks)))
              and all(r.get("world") == len(ranks) and r.get("shards") == len(self.shards)
                      and r.get("seed") == self.seed for r in ranks)):
            self.state = continue_split(ranks, len(self.shards), self.seed)
        else:  # another data set or seed, or positions from before ranks were gathered
            print(f"note: the data stream was saved for another shard split ({d.get('world')} process(es), "
                  f"{d.get('workers')} worker(s)) without every rank's position; it restarts epoch "
                  f"{d.get('epoch', 0)}", file=sys.stderr)
            self.state = StreamState(int(d.get("epoch", 0)))
        self.skipped, self.seen = int(d.get("skipped", 0)), int(d.get("seen", 0))
        self._it, self._epoch_seen = None, 0

    def _loader(self) -> Iterator[dict[str, Any]]:
        ds = ImageCaptionStream(self.shards, self.resolution, self.seed, self.rank, self.world,
                                StreamState.from_dict(self.state.to_dict()))
        return iter(DataLoader(ds, batch_size=None, num_workers=self.workers, collate_fn=_collate,
                               persistent_workers=False, prefetch_factor=2 if self.workers else None))

    def next(self) -> dict[str, Any]:
        """The next readable sample."""
        empty_epochs = 0
        while True:
            if self._it is None:
                self._it = self._loader()
            try:
                item = next(self._it)
            except StopIteration:
                # an epoch continued from another split may hold nothing for this rank
                empty = self._epoch_seen == 0 and self.state.epoch not in self.state.plans
                empty_epochs = empty_epochs + 1 if empty else 0
                if empty_epochs > 1:
                    raise ProReflowError(f"no readable sample in this process's data ({self.skipped} skipped)") from None
                self.state, self._it, self._epoch_seen = self.state.next_epoch(), None, 0
                continue
            w = item["worker"]
            self.state.workers[w] = [item["shard"] + 1, 0] if item["last"] else [item["shard"], item["index"] + 1]
            self.skipped += item["skipped"]
            if item["pixels"] is not None:
                self.seen += 1
                self._epoch_seen += 1
                return item

    def take(self, n: int) -> list[dict[str, Any]]:
        return [self.next() for _ in range(n)]
