"""Crash-safe training checkpoints: safetensors tensors + JSON metadata, written atomically.

Layout of a run directory:

    <run>/<fit-id>/step-00000200/state.safetensors   model, EMA, optimizer tensors, generator state
    <run>/<fit-id>/step-00000200/meta.json           counters, losses, optimizer/scheduler scalars, RNG
    <run>/<fit-id>/step-00000200/checksums.json      sha256 of every file above, written last
    <run>/<fit-id>/final.safetensors (+ final.json, final.checksums.json)  the finished fit's EMA weights

A checkpoint directory is first written as `.tmp-step-…` and renamed into place, so a
kill at any instant leaves either the previous complete checkpoint or the new one, never
a half-written one. The checksums catch what a rename cannot: bit rot, a truncated copy, an
edited file. Resume uses the newest checkpoint that verifies, says which damaged ones it
skipped, and stops when none verifies. Nothing here unpickles: tensors come from safetensors,
the rest is JSON.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from proreflow.errors import ProReflowError
from proreflow.store import atomic_save_tensors, atomic_write_text, checksum_problem, read_json_object, write_checksums

STEP_PREFIX = "step-"
CHECKSUMS = "checksums.json"
FINAL_CHECKSUMS = "final.checksums.json"
#: where resume reports the damaged checkpoints it skips
Report = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


@dataclass(frozen=True)
class CheckpointConfig:
    """Where and how often a run checkpoints; `resume` picks up the latest complete checkpoint."""

    dir: Path
    every: int = 200
    keep: int = 2
    resume: bool = False

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ProReflowError(f"checkpoint interval must be >= 1 optimizer step, got {self.every}")
        if self.keep < 1:
            raise ProReflowError(f"must keep at least 1 checkpoint, got {self.keep}")

    def for_fit(self, fit_id: str) -> "FitCheckpoints":
        return FitCheckpoints(self, fit_id)


def load_tensors(path: Path) -> dict[str, Tensor]:
    """Load a safetensors file, turning any corruption into one clear error."""
    if not path.is_file():
        raise ProReflowError(f"checkpoint file {str(path)!r} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ProReflowError(f"file {str(path)!r} is corrupt or not safetensors ({exc})") from None


def rng_state() -> dict[str, Any]:
    """Python and numpy global RNG states as JSON (torch's goes in the tensor file)."""
    v, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [v, list(state), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached]}


def set_rng_state(state: dict[str, Any], where: str = "checkpoint") -> None:
    try:
        v, st, gauss = state["python"]
        random.setstate((v, tuple(st), gauss))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise ProReflowError(f"the RNG state in {where} is damaged ({type(exc).__name__}: {exc})") from None


class FitCheckpoints:
    """Checkpoints of one fit (one training stage) inside a run directory."""

    def __init__(self, cfg: CheckpointConfig, fit_id: str) -> None:
        self.cfg, self.root = cfg, Path(cfg.dir) / fit_id
        self._latest: tuple[Path | None] | None = None  # latest()'s answer, so each skip is reported once

    # -- finished fits -------------------------------------------------------------------
    @property
    def final_path(self) -> Path:
        return self.root / "final.safetensors"

    def save_final(self, weights: dict[str, Tensor], meta: dict[str, Any]) -> None:
        atomic_write_text(self.root / "final.json", json.dumps(meta))

        def record(tmp: Path) -> None:  # the checksums exist before the weights count as written
            data = {p.name: p for p in sorted(self.root.glob("final-data-rank*.json"))}
            write_checksums(self.root, FINAL_CHECKSUMS, {"final.json": self.root / "final.json",
                                                         "final.safetensors": tmp, **data})

        atomic_save_tensors(weights, self.final_path, before_replace=record)  # last: its presence marks the fit done

    def load_final(self, report: Report = _stderr) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
        """The finished fit's weights and summary; None when the fit has not finished, or when its final
        files are damaged and an intact step checkpoint can redo its end (which is reported)."""
        if not self.final_path.is_file():
            return None
        problem = checksum_problem(self.root, FINAL_CHECKSUMS)
        if problem is None:
            return load_tensors(self.final_path), _read_json(self.root / "final.json")
        fallback = self.latest(report)
        if fallback is None:
            raise ProReflowError(f"the finished stage in {str(self.root)!r} is damaged ({problem}) and has no step "
                                 f"checkpoint to fall back to; delete the folder {str(self.root)!r} to retrain that "
                                 f"stage, or start a new run")
        report(f"warning: {str(self.final_path)!r} is damaged ({problem}); redoing the end of that stage from "
               f"{str(fallback)!r}")
        return None

    def save_final_data(self, rank: int, state: dict[str, Any]) -> None:
        """A data stream's position at the end of the fit (each process its own; before `save_final`)."""
        atomic_write_text(self.root / f"final-data-rank{rank}.json", json.dumps(state))

    def load_final_data(self, rank: int) -> dict[str, Any] | None:
        """This rank's saved position; a rank the run did not have takes rank 0's (it holds every rank's)."""
        path = self.root / f"final-data-rank{rank}.json"
        if not path.is_file():
            path = self.root / "final-data-rank0.json"
        return _read_json(path) if path.is_file() else None

    # -- in-progress checkpoints ---------------------------------------------------------
    def steps(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX))

    def latest(self, report: Report = _stderr) -> Path | None:
        """The newest step checkpoint whose checksums verify (None if there is none at all). Damaged newer ones
        are reported and skipped; if every one is damaged, a ProReflowError says so."""
        if self._latest is not None:
            return self._latest[0]
        damaged = []
        for path in reversed(self.steps()):
            problem = checksum_problem(path, CHECKSUMS)
            if problem is None:
                for bad, why in damaged:
                    report(f"warning: checkpoint {str(bad)!r} is damaged ({why}); resuming from {str(path)!r}")
                self._latest = (path,)
                return path
            damaged.append((path, problem))
        if damaged:
            bad, why = damaged[0]
            raise ProReflowError(f"no intact checkpoint in {str(self.root)!r}: {len(damaged)} damaged, the newest "
                                 f"{bad.name} because {why}; delete the folder {str(self.root)!r} to retrain that "
                                 f"stage from its start, or start a new run")
        self._latest = (None,)
        return None

    def save(self, step: int, tensors: dict[str, Tensor], meta: dict[str, Any], is_main: bool,
             rank: int, rank_state: dict[str, Any], barrier) -> Path:
        """Every rank writes its RNG file into a temp dir; the main rank writes the rest and renames it."""
        self._latest = None
        final = self.root / f"{STEP_PREFIX}{step:08d}"
        tmp = self.root / f".tmp-{STEP_PREFIX}{step:08d}"
        if is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        barrier()
        atomic_write_text(tmp / f"rng-rank{rank}.json", json.dumps(rank_state))
        if is_main:
            atomic_save_tensors(tensors, tmp / "state.safetensors")
            atomic_write_text(tmp / "meta.json", json.dumps(meta))
        barrier()
        if is_main:  # checksums last: a folder without them never verifies
            write_checksums(tmp, CHECKSUMS, {p.name: p for p in sorted(tmp.iterdir())
                                             if p.is_file() and not p.name.startswith(".")})
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in self.steps()[: -self.cfg.keep]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    def load(self, path: Path, rank: int) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any]]:
        tensors = load_tensors(path / "state.safetensors")
        meta = _read_json(path / "meta.json")
        rank_file = path / f"rng-rank{rank}.json"
        if not rank_file.is_file():  # written by fewer processes: the new ones start from rank 0's RNG state
            rank_file = path / "rng-rank0.json"
        return tensors, meta, _read_json(rank_file)


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, "checkpoint metadata", "resume cannot use it")


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON scalars."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"optim.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for key, v in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
