"""`proreflow mini-teacher`, registered on `proreflow.cli.app` (its own file: cli.py is at the 400-line limit).
It imports only below the CLI at module level; the CLI's shared helpers are imported when it runs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from proreflow.errors import ProReflowError


def mini_teacher(
    out: Optional[Path] = typer.Option(None, help="Output folder: a StableDiffusionPipeline (from_pretrained loads it), "
                                                  "classifier/ (the offline FD / prompt-accuracy classifier), "
                                                  "mini_teacher.json and cache/ (the trained stages, reused)."),
    preset: Optional[str] = typer.Option(None, "--preset", "--config", help="A YAML changing keys of the packaged "
                                                                           "mini-sd preset, or a preset name."),
    data: Optional[str] = typer.Option(None, help="Train on your images + captions instead of Fashion-MNIST: a folder "
                                                  "(image + same-named .txt), webdataset .tar shards, or hf:NAME[:SPLIT]."),
    seed: Optional[int] = typer.Option(None, help="Seed of initialisation, data order and noise (default: the preset's)."),
    resume: Optional[str] = typer.Option(None, help="'latest': continue an interrupted stage from its last checkpoint "
                                                    "(finished stages are always reused from OUT/cache)."),
    write_data: Optional[Path] = typer.Option(None, help="Only write a Fashion-MNIST split as PNGs + .txt captions "
                                                         "into this folder (for --data of distill or this command, "
                                                         "or --reference of evaluate), then stop."),
    split: str = typer.Option("train", help="The split --write-data writes: train (60k) or test (10k)."),
    limit: Optional[int] = typer.Option(None, help="Use (or write) only the first N training images."),
    report_to: str = typer.Option("tensorboard", help="Where the VAE's and UNet's curves go: tensorboard "
                                                      "(OUT/logs), wandb or none (docs/monitoring.md)."),
    quiet: bool = typer.Option(False, help="No progress bars or log lines."),
) -> None:
    """Train a mini Stable Diffusion teacher on CPU (SD1.5's shape, schedule and objective; ~21 min on 2 cores with
    the default preset) and write it as a diffusers StableDiffusionPipeline folder (docs/mini-sd.md)."""
    from proreflow.cli import _check_seed, _errors, _monitor, _resume_latest

    with _errors("continue with --resume latest (finished stages are reused)", quiet=quiet, libraries=True):
        _check_seed(seed)
        if limit is not None and limit < 2:
            raise ProReflowError(f"--limit must be >= 2, got {limit}")
        if write_data is not None:
            from proreflow.data.fashion import write_image_folder
            from proreflow.store import check_output_dir

            check_output_dir(write_data, "--write-data")
            n = write_image_folder(write_data, split=split, limit=limit, seed=seed or 0)
            typer.echo(f"wrote {n} images + captions to {write_data}")
            return
        if out is None:
            raise ProReflowError("--out is required (or --write-data to only write the data set)")
        from proreflow.apps.minisd import load_minisd_config, train_mini_teacher
        from proreflow.training import stop_on_sigterm

        resume_latest = _resume_latest(resume)
        monitor = _monitor(report_to, 0)
        cfg = load_minisd_config(preset, seed=seed)
        if limit is not None:
            from dataclasses import replace

            cfg = replace(cfg, data=replace(cfg.data, limit=limit))
        with stop_on_sigterm():
            summary = train_mini_teacher(cfg, out, data=data, resume=resume_latest, progress=not quiet,
                                         monitor=monitor)
    acc = summary.get("classifier_heldout_accuracy")
    typer.echo(f"mini teacher written to {out} (StableDiffusionPipeline.from_pretrained loads it); "
               f"trained in {summary['train_seconds_total']:.0f} s" +
               (f"; classifier held-out accuracy {acc:.3f} in {out / 'classifier'}" if acc is not None else ""))
