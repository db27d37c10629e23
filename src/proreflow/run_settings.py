"""What a run folder records about the settings that made it, and the two refusals built on it (docs/reliability.md):
resume only the run that was started (`check_resumed_settings`), and never replace a finished result with one made
with other settings unless asked to (`check_not_replacing`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from proreflow.errors import ProReflowError
from proreflow.store import atomic_write_text, read_json_object


def settings_changes(before: Any, now: Any, prefix: str = "") -> list[str]:
    """What differs between two JSON-like settings, as `key.sub: old -> new` (values cut to 60 characters): the
    one-line diff a refused resume prints."""
    if isinstance(before, dict) and isinstance(now, dict):
        out: list[str] = []
        for key in sorted(set(before) | set(now), key=str):
            out += settings_changes(before.get(key), now.get(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    if before == now:
        return []
    cut = lambda v: (lambda r: r if len(r) <= 60 else r[:57] + "...")(json.dumps(v, default=str))
    return [f"{prefix or 'settings'}: {cut(before)} -> {cut(now)}"]


def _summary(changes: list[str], most: int) -> str:
    """The first `most` changes, and how many more."""
    return "; ".join(changes[:most]) + (f"; and {len(changes) - most} more" if len(changes) > most else "")


def check_resumed_settings(folder: Path, settings: dict[str, Any], resume: bool) -> None:
    """Resume is for the same run: `folder/run.json` holds the settings a run started with (`record_settings`),
    and `resume` refuses a missing file or any difference, with a one-line diff. Validation only: nothing is
    written, so call it before the run takes its folder."""
    if not resume:
        return
    path = Path(folder) / "run.json"
    if not path.is_file():
        raise ProReflowError(f"--resume latest: {str(folder)!r} holds no run to resume (no run.json)")
    changes = settings_changes(read_json_object(path, "the run's settings",
                                                "it cannot be resumed; start a new run with another --out"),
                               json.loads(json.dumps(settings, default=str)))
    if changes:
        raise ProReflowError(f"--resume latest: the run in {str(folder)!r} was started with different settings "
                             f"({_summary(changes, 4)}); resume with the same ones or start a new run with another "
                             f"--out")


def check_not_replacing(path: Path, settings: dict[str, Any], overwrite: bool, what: str,
                        recorded: Callable[[dict[str, Any]], Any] = lambda old: old) -> None:
    """A finished result is never replaced by a run with other settings unless `overwrite`: `path` (a results or
    settings JSON file) holds the earlier run's settings (`recorded` picks them out of it); the same settings may
    run again (they reuse caches and rewrite the same result). Validation only: call it before any work."""
    path = Path(path)
    if overwrite or not path.is_file():
        return
    old = recorded(read_json_object(path, f"the record of {what}", "pass --overwrite to replace it or choose "
                                                                   "another --out"))
    changes = settings_changes(old, json.loads(json.dumps(settings, default=str)))
    if changes:
        raise ProReflowError(f"{str(path.parent)!r} holds {what} made with other settings "
                             f"({_summary(changes, 3)}); pass --overwrite to replace them or choose another --out")


def record_settings(folder: Path, settings: dict[str, Any]) -> None:
    """Write the settings a new run starts with to `folder/run.json` (one process), for `check_resumed_settings`."""
    atomic_write_text(Path(folder) / "run.json", json.dumps(settings, indent=2, default=str) + "\n")


def folder_fingerprint(spec: str | Path) -> str:
    """What a data spec points at, cheaply: the spec itself for `hf:` names, else the sha256 of every file's
    relative path and size under it (a changed, added or removed image changes it; touching one does not)."""
    import glob

    s = str(spec)
    p = Path(s)
    if s.startswith("hf:"):
        return s
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
    else:  # one file, or a glob of tar shards
        files = [p] if p.is_file() else sorted(Path(f) for f in glob.glob(s) if Path(f).is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(p) if p.is_dir() else f.name}\0{f.stat().st_size}\n".encode())
    return f"{len(files)} files, sha256 {h.hexdigest()[:16]}"
