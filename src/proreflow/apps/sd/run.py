"""`proreflow distill` end to end: check everything, read the data, load and encode, distil, export.
The CLI maps flags onto `run_distill`; benchmarks call the same function."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from proreflow.apps.sd.config import DistillConfig
from proreflow.apps.sd.distill import distill
from proreflow.apps.sd.encode import TEXT_DTYPE, encode_prompts_only, encode_records, load_pipeline
from proreflow.apps.sd.stream import StreamingLatents
from proreflow.apps.sd.validate import pick_prompts
from proreflow.data.captions import read_prompts, read_source
from proreflow.data.stream import StreamIterator
from proreflow.errors import ProReflowError
from proreflow.run_lock import run_lock
from proreflow.run_settings import check_resumed_settings, folder_fingerprint, record_settings
from proreflow.store import check_output_dir, sha256_file
from proreflow.training import MonitorConfig, check_optimizer, process_state
from proreflow.training.checkpoint import CheckpointConfig


def run_distill(cfg: DistillConfig, out: Path, data: str | None = None, prompts: Path | None = None,
                seed: int | None = None, encode_cache: Path | None = None, checkpoint_every: int = 500,
                resume: bool = False, progress: bool = True, on_step: Callable[..., None] | None = None,
                stream: bool = False, data_workers: int = 2, text_dtype: str = TEXT_DTYPE,
                monitor: MonitorConfig | None = None, validation_prompts: Path | None = None,
                pair_cache: Path | None = None) -> dict[str, Any]:
    """Distil `cfg`'s teacher on images + captions (`data`: folder, tar shards or hf:NAME) or on prompts only,
    into the diffusers pipeline `out`. Every input is checked before the pipeline is loaded. With `stream`,
    `data` (tar shards, an image folder or hf:NAME) is read by `data_workers` DataLoader workers and encoded
    batch by batch (`apps.sd.stream`) instead of being encoded up front and held in memory. Encoded up front,
    text states are held (and cached) in `text_dtype` (`encode.TEXT_DTYPE`; "float32" keeps them exact).
    `monitor`: curves under `out/logs/distill`; with `validate_every`, `validation_prompts` (a prompt file; default:
    the first 4 distinct captions) rendered by the EMA student over the teacher (`apps.sd.validate`). `pair_cache`:
    teacher pairs remembered there by their inputs and loaded by any run that draws them again (`distill`)."""
    seed = cfg.train.seed if seed is None else seed  # --seed wins; unset, the preset's (it was silently 0)
    cfg = replace(cfg, train=replace(cfg.train, seed=seed, progress=progress))
    check_optimizer(cfg.train)
    check_output_dir(out)
    for folder, flag in ((encode_cache, "--encode-cache"), (pair_cache, "--pair-cache")):
        if folder is not None:
            check_output_dir(folder, flag)
    ckpt = CheckpointConfig(out / "checkpoints", checkpoint_every, 2, resume)
    if not resume and (out / "model_index.json").exists():
        raise ProReflowError(f"{str(out)!r} already holds a pipeline; choose another --out")
    if not resume and ckpt.dir.exists():  # an interrupted run: starting over would write over its checkpoints
        raise ProReflowError(f"{str(out)!r} holds an interrupted run (checkpoints/); pass --resume latest to continue "
                             f"it or choose another --out")
    if resume and not ckpt.dir.is_dir():
        raise ProReflowError(f"--resume latest: {str(out)!r} holds no run to resume (no checkpoints/); "
                             f"drop --resume to start one")
    if (data is None) == (prompts is None):
        raise ProReflowError("pass exactly one of --data (images + captions) or --prompts (prompt-only mode)")
    if stream:
        if data is None or encode_cache is not None:
            raise ProReflowError("--stream reads --data (tar shards, an image folder or hf:NAME) as it trains; it "
                                 "does not take --prompts or --encode-cache")
        if data_workers < 0:
            raise ProReflowError(f"--data-workers must be >= 0, got {data_workers}")
        state = process_state()  # the shards are found and split before anything is loaded
        stream_ = StreamIterator(data, cfg.resolution, seed, state.process_index, state.num_processes, data_workers)
    else:
        records = read_source(data) if data is not None else read_prompts(prompts)
    shown = None
    if monitor is not None and monitor.validate_every:
        given = read_prompts(validation_prompts) if validation_prompts is not None else None
        captions = None if stream else [r if isinstance(r, str) else r[1] for r in records[:1000]]
        shown = pick_prompts(given, captions)
    elif validation_prompts is not None:
        raise ProReflowError("--validation-prompts is rendered only with --validate-every N (N > 0)")
    pipe = load_pipeline(cfg.model)  # float32: build_teacher_student casts only the frozen weights
    settings = _settings(cfg, data, prompts, stream, text_dtype)
    check_resumed_settings(out, settings, resume)
    main = process_state().is_main_process
    with run_lock(out, main):  # one writer per folder, from here to the export
        if main and not resume:
            record_settings(out, settings)
        if stream:
            source = StreamingLatents(pipe, stream_)
        elif data is not None:
            source = encode_records(pipe, records, cfg.resolution, seed, encode_cache, progress=progress,
                                    text_dtype=text_dtype)
        else:
            source = encode_prompts_only(pipe, records, cfg.resolution, text_dtype)
        return distill(cfg, pipe, source, out, ckpt, on_step=on_step, monitor=monitor, validation_prompts=shown,
                       pair_cache=pair_cache)


def _settings(cfg: DistillConfig, data: str | None, prompts: Path | None, stream: bool, text_dtype: str) -> dict:
    """Everything that decides what a distillation trains (run.json; `--resume` must match it): the resolved
    config (seed included), what --data or --prompts holds, streaming and the text-state dtype."""
    import json
    from dataclasses import asdict

    config = json.loads(json.dumps(asdict(replace(cfg, train=replace(cfg.train, progress=True))), default=str))
    where = None if data is None else (data if str(data).startswith("hf:") else str(Path(data).resolve()))
    return {"config": config, "data": where, "data_fingerprint": None if data is None else folder_fingerprint(data),
            "prompts": None if prompts is None else str(Path(prompts).resolve()),
            "prompts_sha256": None if prompts is None else sha256_file(Path(prompts)), "stream": stream,
            "text_dtype": text_dtype}
