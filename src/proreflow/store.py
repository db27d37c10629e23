"""Files that survive a crash, and the fingerprints that key caches.

Every file is written atomically (temp file, fsync, rename), so a reader sees the old file or the new one,
never a torn one. `ShardStore` keeps tensors in safetensors shards under a checksummed manifest (pair caches,
distill's latent cache). `json_key` and `module_digest` name caches by what made them.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file, save_file
from torch import Tensor

from proreflow.errors import ProReflowError


def atomic_save_tensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None,
                        before_replace: Callable[[Path], None] | None = None) -> None:
    """safetensors file written to a temp name, fsynced and renamed over `path`. `before_replace(tmp)` runs
    on the complete temp file just before the rename (to record its checksum before the file counts)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    _sort_metadata(tmp)
    _fsync(tmp)
    if before_replace is not None:
        before_replace(tmp)
    os.replace(tmp, path)


#: what reading a damaged or half-written safetensors file raises (the caller makes the file again)
DAMAGED_FILE_ERRORS = (SafetensorError, OSError, KeyError, RuntimeError, ValueError)


def save_strided(tensors: dict[str, Tensor], path: Path, extra: dict[str, Tensor] | None = None) -> None:
    """`atomic_save_tensors` of `tensors` with each one's strides (`<name>.stride`), so `load_strided` gives it back
    in the same memory layout (channels-last stays channels-last: the same kernels, bitwise the same math), and of
    `extra` as they are."""
    strides = {f"{k}.stride": torch.tensor(v.stride(), dtype=torch.int64) for k, v in tensors.items()}
    atomic_save_tensors({**tensors, **strides, **(extra or {})}, path)


def load_strided(path: Path, keys: tuple[str, ...], device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """The tensors `keys` of a `save_strided` file, each in its saved strides on `device`; other entries as stored.
    Raises one of DAMAGED_FILE_ERRORS for a damaged file or a missing key."""
    got = load_file(str(path))
    for k in keys:
        got[k] = torch.empty_strided(got[k].shape, got.pop(f"{k}.stride").tolist(), dtype=got[k].dtype,
                                     device=device).copy_(got[k])
    return got


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header in place with its metadata keys sorted. safetensors writes the metadata from a
    Rust HashMap, whose order changes from process to process, so identical runs wrote files whose bytes differed
    (users compare students with cmp or hashes). The sorted header has the same length; the tensors do not move."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        header = json.loads(raw)
        if len(header.get("__metadata__") or {}) < 2:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > n or len(text) != len(raw.rstrip(b" ")):
            return  # not the compact form expected: leave the file as safetensors wrote it
        f.seek(8)
        f.write(text + b" " * (n - len(text)))


def atomic_write_text(path: Path, text: str) -> None:
    """Text file written to a temp name, fsynced and renamed over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)


def check_output_dir(path: Path, flag: str = "--out") -> None:
    """Refuse, before any work, an output folder that cannot be made or written: an existing file, a path
    below a file, a read-only or virtual file system. Probes by making (and removing) a temporary folder
    in the nearest existing ancestor, so nothing is left behind and the folder itself is not created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ProReflowError(f"{flag} {str(path)!r} exists and is not a folder")
    base = path.absolute()
    while not base.exists() and base.parent != base:
        base = base.parent
    if not base.is_dir():
        raise ProReflowError(f"{flag} {str(path)!r} cannot be created: {str(base)!r} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".proreflow-write-test-", dir=base))
    except OSError as exc:
        raise ProReflowError(f"{flag} {str(path)!r} cannot be written ({exc.strerror or type(exc).__name__} in "
                             f"{str(base)!r})") from None


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def read_json_object(path: Path, what: str, advice: str) -> dict[str, Any]:
    """A JSON object from `path`, or one ProReflowError naming `what` is damaged and what to do (`advice`)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProReflowError(f"{what} {str(path)!r} is missing; {advice}") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ProReflowError(f"{what} {str(path)!r} is damaged ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:120]}); {advice}") from None
    if not isinstance(data, dict):
        raise ProReflowError(f"{what} {str(path)!r} is damaged (not a JSON object); {advice}")
    return data


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_checksums(folder: Path, name: str, files: dict[str, Path]) -> None:
    """Record in `folder/name`, atomically, the sha256 of each file under the name it has (or will have once
    renamed into place) in `folder`. `checksum_problem` verifies them."""
    sums = {f: sha256_file(path) for f, path in files.items()}
    atomic_write_text(folder / name, json.dumps({"sha256": sums}, indent=1, sort_keys=True))


def checksum_problem(folder: Path, name: str) -> str | None:
    """None when every file listed in `folder/name` is present with its recorded sha256, else why not."""
    try:
        listed = json.loads((folder / name).read_text())["sha256"]
        if not isinstance(listed, dict) or not listed:
            raise TypeError
    except FileNotFoundError:
        return f"it has no {name} (written by an older proreflow, or damaged)"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"its {name} is unreadable"
    for file, digest in sorted(listed.items()):
        path = folder / str(file)
        if not path.is_file():
            return f"{file} is missing"
        if sha256_file(path) != digest:
            return f"{file} does not match its checksum"
    return None


def json_key(*parts: Any, length: int = 12) -> str:
    """A short name for settings (anything JSON can print): equal settings, equal key."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def module_digest(module: torch.nn.Module, which: Literal["frozen", "trainable"] = "frozen") -> str:
    """sha256 of a network's tensors, names included. "frozen": every weight and buffer that does not require
    grad (a teacher's identity: a LoRA student's adapters ride on its adapters-off teacher); "trainable": the
    parameters being trained (to check that all processes agree)."""
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    return tensor_digest({n: t for n, t in module.state_dict().items() if (n in trainable) == (which == "trainable")},
                         shapes=False)


def tensor_digest(tensors: dict[str, Tensor], shapes: bool = True) -> str:
    """sha256 of named tensors' bytes in name order (with their dtypes and shapes unless `shapes=False`: a
    module's names already fix them, and its digests stay what they were)."""
    h = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        h.update(name.encode())
        if shapes:
            h.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an advisory lock on the file `path` (POSIX flock; a no-op where there is none). Two processes
    building one store take turns: the second finds the first's shards valid instead of writing the same
    files, temp files and manifest at the same time (a finished builder could read the other's partial one)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: builds of one store must not overlap
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class ShardStore:
    """Tensors in safetensors shards under `root` with a checksummed manifest tied to a spec.

    Shards and the manifest are written atomically (temp file + rename), the manifest after every
    shard, so a crash loses at most the shard in flight; a shard whose sha256 does not match the
    manifest, or a manifest written for another spec, is never used. Callers make each shard from
    its own seed so that a missing or damaged shard is rebuilt bit for bit.
    """

    MANIFEST = "manifest.json"
    LOCK = ".build.lock"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _manifest(self) -> dict | None:
        try:
            return json.loads((self.root / self.MANIFEST).read_text())
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:
            return None  # a manifest is only ever replaced atomically; unreadable means start over

    def _write_manifest(self, manifest: dict) -> None:
        atomic_write_text(self.root / self.MANIFEST, json.dumps(manifest, indent=1))

    def valid_shards(self, spec: dict) -> set[int]:
        """Indices of shards present on disk whose bytes match the manifest's checksum."""
        manifest = self._manifest()
        if manifest is None or manifest.get("spec") != spec:
            return set()
        ok = set()
        for idx, entry in manifest["shards"].items():
            path = self.root / entry["file"]
            if path.is_file() and sha256_file(path) == entry["sha256"]:
                ok.add(int(idx))
        return ok

    def build(self, spec: dict, n_shards: int, make: Callable[[int], tuple[dict[str, Tensor], dict]],
              progress: bool = False, desc: str = "shards", after_each: Callable[[], None] | None = None) -> None:
        """Make (with `make(i) -> (tensors, metadata)`) and write every shard not valid on disk.
        `after_each()` runs once each shard is safely on disk; it may raise to stop the build there
        (a SIGTERM between shards), and the next build resumes at the first missing shard."""
        from tqdm.auto import tqdm

        self.root.mkdir(parents=True, exist_ok=True)
        with exclusive(self.root / self.LOCK):  # stores shared between runs (pair caches) may be built by two at once
            manifest = self._manifest()
            if manifest is None or manifest.get("spec") != spec:
                manifest = {"spec": spec, "shards": {}}
            good = self.valid_shards(spec)
            for i in tqdm([i for i in range(n_shards) if i not in good], desc=desc, disable=not progress, leave=False):
                tensors, meta = make(i)
                name = f"shard-{i:05d}.safetensors"
                atomic_save_tensors(tensors, self.root / name)
                manifest["shards"][str(i)] = {"file": name, "sha256": sha256_file(self.root / name), **meta}
                self._write_manifest(manifest)
                if after_each is not None:
                    after_each()

    def load(self, spec: dict, n_shards: int) -> tuple[list[dict[str, Tensor]], list[dict]]:
        """Every shard's tensors and manifest entry, in order; an error if any is missing or damaged."""
        manifest = self._manifest()
        if manifest is None or len(self.valid_shards(spec) & set(range(n_shards))) != n_shards:
            raise ProReflowError(f"cache {str(self.root)!r} is incomplete or damaged; rebuild it")
        entries = [manifest["shards"][str(i)] for i in range(n_shards)]
        return [load_file(str(self.root / e["file"])) for e in entries], entries

    def shard_name(self, i: int) -> str:
        return f"shard-{i:05d}.safetensors"

    def add_shard(self, spec: dict, i: int, tensors: dict[str, Tensor], meta: dict) -> None:
        """Write shard `i` and merge its entry into the manifest, while other processes may be adding other
        shards of the same spec: the shard is written under a temp name of this process's own and renamed into
        place, and only the manifest's read-modify-write holds the store's lock (milliseconds). Two processes
        adding the same shard write the same bytes when shards are deterministic (see `build_share`)."""
        name = self.shard_name(i)
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        _fsync(tmp)
        digest = sha256_file(tmp)
        os.replace(tmp, path)
        with exclusive(self.root / self.LOCK):
            manifest = self._manifest()
            if manifest is None or manifest.get("spec") != spec:
                manifest = {"spec": spec, "shards": {}}
            manifest["shards"][str(i)] = {"file": name, "sha256": digest, **meta}
            self._write_manifest(manifest)

    def _entry(self, spec: dict, i: int) -> dict | None:
        manifest = self._manifest()
        if manifest is None or manifest.get("spec") != spec:
            return None
        entry = manifest["shards"].get(str(i))
        return entry if entry is not None and (self.root / entry["file"]).is_file() else None

    def build_share(self, spec: dict, n_shards: int, make: Callable[[int], tuple[dict[str, Tensor], dict]],
                    rank: int, world: int, progress: bool = False, desc: str = "shards") -> list[int]:
        """This process's share of a store that `world` processes build at once: shards `rank`, `rank + world`,
        ... that are not valid on disk (each checked by its own checksum), made and added one by one
        (`add_shard`). `make(i)` must depend only on the data, `i` and a seed, never on `rank` or `world`, so
        that the store is the same bytes whatever the number of processes and a resume on another number
        reuses it. Returns the indices made here."""
        from tqdm.auto import tqdm

        self.root.mkdir(parents=True, exist_ok=True)
        mine = [i for i in range(rank, n_shards, world) if not self._shard_ok(spec, i)]
        for i in tqdm(mine, desc=desc, disable=not progress, leave=False):
            tensors, meta = make(i)
            self.add_shard(spec, i, tensors, meta)
        return mine

    def _shard_ok(self, spec: dict, i: int) -> bool:
        entry = self._entry(spec, i)
        return entry is not None and sha256_file(self.root / entry["file"]) == entry["sha256"]

    def load_when_complete(self, spec: dict, n_shards: int, make: Callable[[int], tuple[dict[str, Tensor], dict]],
                           poll_s: float = 5.0, stall_s: float = 3600.0, report: Callable[[str], None] = print
                           ) -> list[dict[str, Tensor]]:
        """Every shard's tensors, in order, once the processes building the store have added them: polls the
        manifest (no collective, so no timeout however long the others take), saying what it waits for every
        minute. Each shard is read once and checked against its checksum as it is loaded; one listed but
        damaged (left by an earlier run, not yet repaired by the process whose share it is) is made here,
        the same bytes. Raises if no shard has appeared for `stall_s` seconds (a builder died)."""
        out: list[dict[str, Tensor]] = []
        last_change, last_report, seen = time.monotonic(), time.monotonic(), -1
        for i in range(n_shards):
            while True:
                entry = self._entry(spec, i)
                if entry is not None:
                    data = (self.root / entry["file"]).read_bytes()
                    if hashlib.sha256(data).hexdigest() == entry["sha256"]:
                        out.append(load_bytes(data))
                        break
                    self.add_shard(spec, i, *make(i))
                    continue
                now = time.monotonic()
                manifest = self._manifest() or {}
                done = len(manifest.get("shards", {})) if manifest.get("spec") == spec else 0
                if done != seen:
                    seen, last_change = done, now
                if now - last_change > stall_s:
                    raise ProReflowError(f"cache {str(self.root)!r}: shard {i} of {n_shards} has not appeared and no "
                                         f"shard was added for {stall_s:.0f} s; the process building it may have died. "
                                         f"Run again: finished shards are kept")
                if now - last_report >= 60:
                    report(f"waiting for other processes' shards of {str(self.root)!r}: {done} of {n_shards} done")
                    last_report = now
                time.sleep(poll_s)
        return out
