"""`proreflow evaluate`, registered on `proreflow.cli.app` (its own file keeps cli.py under 400 lines).
It imports only below the CLI at module level; the CLI's shared helpers are imported when it runs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def evaluate(
    out: Path = typer.Option(..., help="Output folder: runs/<row>/ images, results.json, results.md, cfg_sweep.png."),
    suite: Optional[str] = typer.Option(None, help="A suite YAML or preset name (eval-table1, eval-table2, eval-table3)."),
    model: Optional[str] = typer.Option(None, help="A diffusers pipeline folder or hub id (without --suite)."),
    name: Optional[str] = typer.Option(None, help="Method name in the table (default: the model's last path part)."),
    scheduler: Optional[str] = typer.Option(None, help="ddim, euler, dpmsolver, dpmsolver++, unipc, lcm, tcd, proreflow; "
                                                       "published students: perflow (PeRFlow SD1.5), "
                                                       "perflow-ddim-eps (PeRFlow SDXL), perflow-velocity (PeRFlow SD2.1), "
                                                       "rectified-flow (InstaFlow, 2-RF). Default: the pipeline's own."),
    steps: Optional[int] = typer.Option(None, help="Sampling steps (NFE per image without CFG; default 4)."),
    guidance: Optional[str] = typer.Option(None, help="Guidance scale (default 4); comma-separated scales make a CFG "
                                                      "sweep and its plot."),
    lora: Optional[str] = typer.Option(None, help="LoRA weights (folder or hub id) fused into the model, e.g. LCM-LoRA."),
    variant: Optional[str] = typer.Option(None, help="Weights variant to load, e.g. fp16."),
    pipeline: Optional[str] = typer.Option(None, help="diffusers pipeline class to load the model with, when its "
                                                      "model_index.json names one diffusers lacks."),
    unet_delta: Optional[str] = typer.Option(None, help="UNet weight delta (diffusers UNet folder or hub id) added to "
                                                        "the model's UNet, e.g. hansyan/perflow-sd15-delta-weights."),
    delta_variant: Optional[str] = typer.Option(None, help="Weights variant of --unet-delta, e.g. v0-1."),
    unet_weights: Optional[str] = typer.Option(None, help="UNet state-dict file (.safetensors/.ckpt) replacing the "
                                                          "model's UNet weights, e.g. Rectified Diffusion's rd.ckpt."),
    scheduler_setting: Optional[list[str]] = typer.Option(None, help="KEY=VALUE laid over a named diffusers "
                                                                     "scheduler's config (repeatable), e.g. "
                                                                     "beta_schedule=linear."),
    timestep_spacing: Optional[str] = typer.Option(None, help="Step grid of a named DDIM/Euler/DPM-Solver/UniPC "
                                                              "scheduler: trailing (default), leading, linspace, "
                                                              "or 'own' for the pipeline's."),
    captions: Optional[str] = typer.Option(None, help="coco2017-5k (default), coco2014-30k, coco2014-10k or prompts."),
    annotations: Optional[str] = typer.Option(None, help="COCO captions_val2017.json / captions_val2014.json."),
    prompts: Optional[str] = typer.Option(None, help="Prompt file, one prompt per line (with --captions prompts)."),
    num_images: Optional[int] = typer.Option(None, help="Number of captions (default: the caption set's size)."),
    resolution: Optional[int] = typer.Option(None, help="Image size in pixels (default 512)."),
    seed: Optional[int] = typer.Option(None, help="Seed of the caption subset and of each image's noise."),
    batch_size: Optional[int] = typer.Option(None, help="Images per pipeline call (default 8)."),
    dtype: Optional[str] = typer.Option(None, help="auto (fp16 on CUDA), float32, float16 or bfloat16."),
    reference: Optional[str] = typer.Option(None, help="Folder of real images for FID."),
    ref_stats: Optional[str] = typer.Option(None, help="Precomputed FID statistics (.npz or .safetensors: mu, sigma)."),
    save_ref_stats: Optional[str] = typer.Option(None, help="Save the reference statistics here (.npz or .safetensors)."),
    ref_resize: Optional[bool] = typer.Option(None, "--ref-resize/--no-ref-resize",
                                              help="Centre-crop and resize reference images to the resolution."),
    ref_same_images: Optional[bool] = typer.Option(None, "--ref-same-images/--all-ref-images",
                                                   help="Use only the reference images of the chosen COCO ids."),
    inception: Optional[str] = typer.Option(None, help="Path of inception-2015-12-05.pt (or set $PROREFLOW_INCEPTION)."),
    classifier: Optional[str] = typer.Option(None, help="Classifier folder: adds prompt accuracy (docs/mini-sd.md)."),
    protocol: Optional[str] = typer.Option(None, help="ours (default) or rectified-diffusion (paper [40])."),
    clip_model: Optional[str] = typer.Option(None, help="CLIP model id or folder (default: the protocol's)."),
    fid: Optional[bool] = typer.Option(None, "--fid/--no-fid", help="Compute FID (default on)."),
    clip: Optional[bool] = typer.Option(None, "--clip/--no-clip", help="Compute CLIP score (default on)."),
    warmup_batches: Optional[int] = typer.Option(None, help="Untimed batches before timing (default 2)."),
    timing_batches: Optional[int] = typer.Option(None, help="Timed batches (default 5; 0: no timing)."),
    timing_batch_size: Optional[int] = typer.Option(None, help="Images per timed batch (default: --batch-size)."),
    overwrite: bool = typer.Option(False, help="Replace the results of other rows or settings in --out (refused "
                                               "without; the same evaluation reruns, reusing its images)."),
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """Generate images (resumable), time them, and compute FID and CLIP score: one paper table per suite."""
    from proreflow.apps.coco_eval import evaluate as run_evaluate
    from proreflow.apps.coco_eval import plan_evaluation

    overrides = dict(captions=captions, annotations=annotations, prompts=prompts, num_images=num_images,
                     resolution=resolution, seed=seed, batch_size=batch_size, dtype=dtype, reference=reference,
                     ref_stats=ref_stats, save_ref_stats=save_ref_stats, ref_resize=ref_resize,
                     ref_same_images=ref_same_images, inception=inception, classifier=classifier, protocol=protocol,
                     clip_model=clip_model, fid=fid, clip=clip, warmup_batches=warmup_batches,
                     timing_batches=timing_batches, timing_batch_size=timing_batch_size, progress=False if quiet else None)
    single = {"--model": model, "--name": name, "--scheduler": scheduler, "--steps": steps, "--guidance": guidance,
              "--lora": lora, "--variant": variant, "--pipeline": pipeline, "--unet-delta": unet_delta,
              "--delta-variant": delta_variant, "--unet-weights": unet_weights,
              "--scheduler-setting": scheduler_setting or None, "--timestep-spacing": timestep_spacing}
    from proreflow.cli import _check_out, _check_seed, _errors

    with _errors(quiet=quiet, libraries=True):
        _check_seed(seed)
        runs, cfg, title = plan_evaluation(suite, single, overrides)
        _check_out(out)
        rows = run_evaluate(runs, cfg, out, title=title, overwrite=overwrite)
    typer.echo((out / "results.md").read_text())
    typer.echo(f"wrote {out / 'results.json'} and {out / 'results.md'} ({len(rows)} row(s))")
