"""`proreflow train`: one method's student on the toy setup, with crash-safe checkpoints and exact resume."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from proreflow.apps.toy.config import ToyConfig, config_to_dict, find_method, with_run_settings
from proreflow.apps.toy.run import Comparison, points_data_fn, prepare, validate_source
from proreflow.errors import ProReflowError
from proreflow.run_lock import run_lock
from proreflow.run_settings import check_resumed_settings, record_settings
from proreflow.store import atomic_save_tensors, atomic_write_text
from proreflow.sampling import sample
from proreflow.training import (Monitor, MonitorConfig, PairCacheConfig, Validation, check_optimizer, points_image,
                                process_state, stop_on_sigterm, train_plan, watching)
from proreflow.training.checkpoint import CheckpointConfig
from proreflow.windows import WindowSchedule


def train_single(cfg: ToyConfig, method: str, k: int, out: Path, seed: int = 0, dataset: str | None = None,
                 data_file: str | None = None, every: int = 200, keep: int = 2, resume: bool = False,
                 progress: bool = True, cached_pairs: int = 0, allow_outliers: bool = False,
                 monitor: MonitorConfig | None = None) -> dict:
    """Train one method's k-step student with checkpoints; save it and its scores to `out`.

    A killed run continues with resume=True (`--resume latest`) from its last checkpoint and
    ends with bitwise the same weights as an uninterrupted run. `monitor`: curves in `out/logs` and, with
    `validate_every`, the student's samples over the teacher's from fixed noise (`training.monitor`).
    """
    spec = find_method(cfg, method)
    if not spec.train:
        raise ProReflowError(f"method {method!r} is the teacher itself; there is nothing to train")
    plan = cfg.recipe(spec).plan(k)  # resolves (and checks) the windows before anything is written
    validate_source(dataset, data_file, allow_outliers)
    check_optimizer(cfg.train)
    ckpt = CheckpointConfig(out / "checkpoints", every, keep, resume)
    run_args = {"method": method, "steps": k, "seed": seed, "dataset": dataset, "cached_pairs": cached_pairs,
                "data": str(Path(data_file).resolve()) if data_file else None, "config": config_to_dict(cfg),
                "allow_outliers": allow_outliers}
    check_resumed_settings(out, run_args, resume)
    if not resume and (ckpt.dir.exists() or (out / "student.safetensors").exists()):
        raise ProReflowError(f"{str(out)!r} already holds a run; pass --resume latest to continue it "
                             f"or choose another --out")
    with run_lock(out, process_state().is_main_process):  # one writer per folder, from here to the end
        if not resume and process_state().is_main_process:
            record_settings(out, run_args)
        cfg = with_run_settings(cfg, seed, progress)
        with stop_on_sigterm():
            setup = prepare(cfg, dataset, data_file, seed, ckpt, allow_outliers)
            started = time.perf_counter()
            pairs = PairCacheConfig(out / "pairs", cached_pairs) if cached_pairs else None
            with watching(_monitor(monitor, out, f"{spec.name}-k{k}", cfg, setup, plan, seed)) as watch:
                res = train_plan(setup.base, setup.teacher, points_data_fn(setup.data.train), cfg.recipe(spec), k,
                                 checkpoints=ckpt, pair_cache=pairs, monitor=watch)
        cmp = Comparison(cfg, setup, seed)
        cmp.add_trained(spec, k, res, time.perf_counter() - started)
        row, _, _ = cmp.score(spec, k)
        state = process_state()
        if state.is_main_process:  # every process holds the same student; one writes it
            meta = {"method": spec.name, "steps": str(k), "windows": json.dumps(plan.final.boundaries),
                    "time_sampling": cfg.recipe(spec).sampling.label(), "pair_source": spec.pair_source}
            atomic_save_tensors(res.student.state_dict(), out / "student.safetensors", metadata=meta)
            atomic_write_text(out / "metrics.json", json.dumps(row, indent=2) + "\n")
        state.wait_for_everyone()
        return row


def _monitor(cfg: MonitorConfig | None, out: Path, name: str, toy: ToyConfig, setup, plan, seed: int) -> Monitor | None:
    """The run's monitor; its validation draws 512 points from fixed noise with the student (one step per window)
    over the teacher's reference solve of the same noise (the evaluation's solver and steps)."""
    if cfg is None:
        return None
    validation = None
    if cfg.validate_every:
        noise = torch.randn(512, setup.data.dim, generator=torch.Generator().manual_seed(seed + 54321))
        reference = sample(setup.teacher, noise, WindowSchedule.uniform(1), toy.eval.reference_steps,
                           method=toy.eval.reference_solver)
        validation = Validation(render=lambda m: sample(m, noise, plan.final, 1), reference=reference,
                                picture=points_image, note=f"{plan.final.num_windows} steps, 512 points")
    return Monitor(cfg, out, name, validation)
