"""Training-step time, peak memory and sampling time of the real SD1.5 / SDXL architectures, on whatever
device there is: random weights with the published shapes (`proreflow.models.sd_shapes`), so it needs no
hub and no downloaded weights, and every number comes from the code users run.

    python benchmarks/sd_sized.py --arch sd15             # on a GPU: the preset's settings, 512 px
    python benchmarks/sd_sized.py --arch sdxl             # 1024 px; one command per architecture
    python benchmarks/sd_sized.py --smoke                 # a check of this script on CPU: sd15, 64 px, LoRA

For each architecture and LoRA rank (0 = full fine-tuning) it runs `proreflow.apps.sd.distill` with the
preset (`sd15-proreflow-I`, `sdxl-proreflow`: method, teacher solver, precision, gradient checkpointing)
on random images encoded by the VAE, and records the median seconds per optimizer step of each stage
(pair generation by the teacher included; the run's first steps and the switch between stages left out:
the 8-window stage pays 4 teacher steps per pair, the 4-window stage 8), their mean over the plan, and
the peak accelerator memory. Then it times sampling, batch 1, median after a warm-up: the 4-step windowed
sampler with CFG (8 UNet evaluations) against the teacher's usual 25-step DDIM with CFG (50), on the same
UNet. An out-of-memory run is recorded as such, any other failure as failed (the error in the JSON), and
the next row runs. Writes benchmarks/results/sd_sized_<device>_<archs>.{json,md} (`--out` to change the
folder), both rewritten after every row, so a run stopped midway leaves every finished row.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

HERE = Path(__file__).parent
PRESETS = {"sd15": "sd15-proreflow-I", "sdxl": "sdxl-proreflow"}
CAPTIONS = ["a red cat", "a blue dog", "a photo of a cat", "the dog", "a cat", "a red dog", "a photo of the dog",
            "a blue cat"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def median_call(fn: Callable[[], Any], repeats: int, device: torch.device, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def image_folder(root: Path, n: int, resolution: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(CAPTIONS[i % len(CAPTIONS)])
    return root


def stage_step_seconds(stamps: list[tuple[int, float]], skip: int) -> tuple[list[float | None], float | None]:
    """Median seconds per optimizer step of each stage from (stage, time) stamps taken after every step, and
    their mean weighted by the stages' step counts (what a whole run of this plan averages). Only gaps between
    two steps of one stage count: the gap into a stage's first step holds the switch (a new optimizer, EMA
    and accelerator), and stages differ in teacher cost. The run's first `skip` steps are warm-up."""
    stages = sorted({s for s, _ in stamps})
    gaps: dict[int, list[float]] = {s: [] for s in stages}
    kept = stamps[skip:]
    for (s0, t0), (s1, t1) in zip(kept, kept[1:]):
        if s0 == s1:
            gaps[s1].append(t1 - t0)
    medians = [statistics.median(gaps[s]) if gaps[s] else None for s in stages]
    if not medians or any(m is None for m in medians):
        return medians, None
    counts = [sum(1 for s, _ in stamps if s == k) for k in stages]
    return medians, sum(c * m for c, m in zip(counts, medians)) / sum(counts)


def train_row(arch: str, lora_rank: int, args: argparse.Namespace, device: torch.device, tmp: Path) -> dict:
    from proreflow.apps.sd import distill, encode_folder, load_distill_config
    from proreflow.models.sd_shapes import build_pipeline

    cfg = load_distill_config(PRESETS[arch], resolution=args.resolution or None, lora_rank=lora_rank,
                              budget_steps=args.train_steps)
    # one device's micro-batch (the preset's per_device_batch), no accumulation: what memory and speed depend on
    train = replace(cfg.train, batch_size=args.batch or cfg.train.per_device_batch or cfg.train.batch_size,
                    per_device_batch=None, progress=False,
                    mixed_precision=cfg.train.mixed_precision if device.type == "cuda" else "no")
    cfg = replace(cfg, train=train, model=f"random weights, {arch} shapes",
                  weights_dtype=args.weights_dtype or cfg.weights_dtype)
    row: dict[str, Any] = {"arch": arch, "lora_rank": lora_rank, "resolution": cfg.resolution,
                           "batch": train.batch_size, "mixed_precision": train.mixed_precision,
                           "weights_dtype": cfg.weights_dtype,
                           "gradient_checkpointing": cfg.gradient_checkpointing, "method": cfg.method.name,
                           "windows": cfg.method.windows, "teacher_solver": f"{cfg.teacher_solver.method} "
                           f"{cfg.teacher_solver.steps} {cfg.teacher_solver.mode}"}
    pipe = build_pipeline(arch, tmp / f"{arch}-parts", device=device)  # random init on a GPU: no CPU minutes
    data = encode_folder(pipe, image_folder(tmp / f"images-{cfg.resolution}", 2 * train.batch_size, cfg.resolution),
                         cfg.resolution)  # leaves the VAE and text encoders on the CPU, as in `proreflow distill`
    stamps: list[tuple[int, float]] = []

    def on_step(stage: int, *_: Any) -> None:
        sync(device)
        stamps.append((stage, time.perf_counter()))

    student = tmp / f"student-{arch}-{lora_rank}"
    reset_peak(device)
    try:
        summary = distill(cfg, pipe, data, student, on_step=on_step)
    except torch.cuda.OutOfMemoryError as exc:
        row.update(status="out of memory", error=str(exc).splitlines()[0][:200], peak_gib=peak_gib(device))
        return row
    finally:
        del pipe, data
        gc.collect()  # the peak is read below, so no reset here
        shutil.rmtree(student, ignore_errors=True)  # an exported fp32 SDXL pipeline is 14 GB of disk
    skip = min(args.skip_steps, max(len(stamps) - 2, 0))
    stage_sec, sec = stage_step_seconds(stamps, skip)
    row.update(status="ok", optimizer_steps=summary["optimizer_steps"], stage_windows=summary["stage_windows"],
               timed_steps=sum(1 for a, b in zip(stamps[skip:], stamps[skip + 1:]) if a[0] == b[0]),
               stage_seconds_per_step=stage_sec, seconds_per_step=sec,
               pairs_per_s=train.batch_size / sec if sec else None,
               teacher_nfe_per_pair=summary["teacher_nfe_per_pair"], peak_gib=peak_gib(device))
    return row


def sampling_rows(arch: str, args: argparse.Namespace, device: torch.device, tmp: Path) -> list[dict]:
    from proreflow.schedulers import make_scheduler
    from proreflow.schedulers.proreflow import scheduler_for
    from proreflow.models.sd_shapes import build_pipeline
    from proreflow.windows import WindowSchedule

    res = args.resolution or {"sd15": 512, "sdxl": 1024}[arch]
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = build_pipeline(arch, tmp / f"{arch}-sampling", device=device).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    teacher_sched = pipe.scheduler
    runs = [("ProReflow student, windowed Euler", scheduler_for(teacher_sched.config, WindowSchedule.uniform(4)), 4, 4.0),
            ("teacher, DDIM (trailing)", make_scheduler("ddim", teacher_sched.config), 25, 7.5)]
    rows = []
    reset_peak(device)
    for name, sched, steps, guidance in runs:
        pipe.scheduler = sched

        def call(steps=steps, guidance=guidance) -> None:
            with torch.no_grad():
                pipe(["a photo of a cat"], num_inference_steps=steps, guidance_scale=guidance, height=res, width=res,
                     generator=torch.Generator().manual_seed(0), output_type="np")

        sec = median_call(call, args.sample_repeats, device)
        rows.append({"arch": arch, "sampler": name, "steps": steps, "unet_evals": 2 * steps, "resolution": res,
                     "dtype": str(dtype).removeprefix("torch."), "seconds_per_image": sec, "status": "ok"})
    rows[0]["speedup_vs_teacher"] = rows[1]["seconds_per_image"] / rows[0]["seconds_per_image"]
    rows[1]["speedup_vs_teacher"] = 1.0
    for r in rows:
        r["peak_gib"] = peak_gib(device)
    return rows  # the pipeline is freed with this frame; the next run resets the peak


def device_label(device: torch.device) -> str:
    from proreflow.apps.coco_eval import device_name

    return device_name(device)


def failed_row(row: dict, exc: BaseException) -> dict:
    """A row whose run raised: recorded (the message in the JSON) so that the next rows still run."""
    traceback.print_exc(file=sys.stderr)
    return {**row, "status": f"failed ({type(exc).__name__})", "error": str(exc).strip()[:500]}


def markdown(result: dict) -> str:
    def num(v: Any, fmt: str) -> str:
        return "–" if v is None else format(v, fmt)

    def stages(v: list | None) -> str:
        return " / ".join(num(x, ".3f") for x in v) if v else "–"

    lines = [f"Device: {result['device']}; torch {result['torch']}, diffusers {result['diffusers']}"
             f"{' (smoke run: not a measurement)' if result['smoke'] else ''}.", "",
             "#### Training (distill, pairs made on the fly)", "",
             "| arch | LoRA rank | px | batch | precision | frozen weights | grad. ckpt | s / step by stage "
             "| s / step (plan mean) | pairs / s | teacher NFE / pair | peak GiB | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["training"]:
        ckpt = {True: "yes", False: "no"}.get(r.get("gradient_checkpointing"), "–")
        lines.append(f"| {r['arch']} | {r['lora_rank'] or 'full'} | {r.get('resolution') or '–'} | {r['batch']} | "
                     f"{r.get('mixed_precision', '–')} | {r.get('weights_dtype', '–')} | {ckpt} | "
                     f"{stages(r.get('stage_seconds_per_step'))} | {num(r.get('seconds_per_step'), '.3f')} | "
                     f"{num(r.get('pairs_per_s'), '.2f')} | {num(r.get('teacher_nfe_per_pair'), '.1f')} | "
                     f"{num(r.get('peak_gib'), '.1f')} | {r['status']} |")
    lines += ["", "#### Sampling (batch 1, CFG)", "",
              "| arch | sampler | steps | UNet evals | px | dtype | s / image | speed-up | peak GiB | status |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["sampling"]:
        lines.append(f"| {r['arch']} | {r.get('sampler', '–')} | {r.get('steps', '–')} | {r.get('unet_evals', '–')} | "
                     f"{r.get('resolution', '–')} | {r.get('dtype', '–')} | {num(r.get('seconds_per_image'), '.3f')} | "
                     f"{num(r.get('speedup_vs_teacher'), '.2f')}{'x' if r.get('speedup_vs_teacher') else ''} | {num(r.get('peak_gib'), '.1f')} | "
                     f"{r.get('status', 'ok')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    import diffusers

    from proreflow.store import atomic_write_text

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", nargs="+", choices=list(PRESETS), default=["sd15"])
    p.add_argument("--lora-ranks", nargs="+", type=int, default=[0, 64], help="0: full fine-tuning")
    p.add_argument("--resolution", type=int, default=0, help="default: the preset's (512 / 1024)")
    p.add_argument("--batch", type=int, default=4, help="per-device batch (default 4; 0: the preset's global batch)")
    p.add_argument("--weights-dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="frozen weights' dtype (default: the preset's, float32); bfloat16 runs the teacher in bf16")
    p.add_argument("--train-steps", type=int, default=12)
    p.add_argument("--skip-steps", type=int, default=2, help="first optimizer steps left out of the median")
    p.add_argument("--sample-repeats", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="CPU check: sd15, 64 px, LoRA 4, 4 steps, batch 2")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    if args.smoke:
        args.arch, args.lora_ranks, args.resolution, args.train_steps = ["sd15"], [4], 64, 4  # 2 steps a stage
        args.batch, args.skip_steps, args.sample_repeats = 2, 0, 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result: dict[str, Any] = {"device": device_label(device), "torch": torch.__version__,
                              "diffusers": diffusers.__version__, "smoke": args.smoke,
                              "args": {k: v for k, v in vars(args).items() if k != "out"},  # no machine's paths
                              "training": [], "sampling": []}
    # one pair of files per device and architecture set: `--arch sd15` and a later `--arch sdxl` keep both
    slug = "smoke" if args.smoke else (re.sub(r"[^a-z0-9]+", "-", result["device"].lower()).strip("-")[:40]
                                       + "_" + "-".join(dict.fromkeys(args.arch)))
    out_json, out_md = args.out / f"sd_sized_{slug}.json", args.out / f"sd_sized_{slug}.md"

    def save() -> None:  # after every row, atomically: a run stopped midway leaves every finished row
        atomic_write_text(out_json, json.dumps(result, indent=1) + "\n")
        atomic_write_text(out_md, markdown(result))

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch:
            for rank in args.lora_ranks:
                t0 = time.perf_counter()
                try:
                    row = train_row(arch, rank, args, device, Path(tmp))
                except Exception as exc:  # noqa: BLE001 - one broken row must not cost the others
                    row = failed_row({"arch": arch, "lora_rank": rank, "resolution": args.resolution or None,
                                      "batch": args.batch}, exc)
                row["row_seconds"] = time.perf_counter() - t0  # building, encoding and export included
                result["training"].append(row)
                print(json.dumps(row), flush=True)
                save()
            try:
                result["sampling"] += sampling_rows(arch, args, device, Path(tmp))
            except Exception as exc:  # noqa: BLE001
                result["sampling"].append(failed_row({"arch": arch}, exc))
            print(json.dumps([r for r in result["sampling"] if r["arch"] == arch]), flush=True)
            result["total_seconds"] = time.perf_counter() - started
            save()
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
