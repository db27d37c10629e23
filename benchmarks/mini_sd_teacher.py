"""How good the mini Stable Diffusion teacher is (docs/mini-sd.md), measured the way a user would: the folder
`proreflow mini-teacher` writes, opened with StableDiffusionPipeline.from_pretrained, sampled with diffusers' own
DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing") at 32 and 4 steps, guidance 1 and 4,
scored by the classifier saved beside it: Fréchet distance (FD) of its features to the 10k held-out test images,
and prompt accuracy (the classifier agrees with the class the prompt names). The reference row is real training
images against the same test images (the FD floor at this sample size).

    .venv/bin/python benchmarks/mini_sd_teacher.py            # trains the teacher (or loads it from the cache)

Writes benchmarks/results/mini_sd_teacher.{json,md} and mini_sd_teacher.png (a grid of samples per class).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from proreflow.apps.minisd import load_minisd_config, train_mini_teacher
from proreflow.data.fashion import CLASS_PHRASES, TEMPLATES, load_fashion
from proreflow.metrics_classifier import ClassifierMetrics, to_classifier_input
from results_io import write_results

RESULTS = Path(__file__).parent / "results"


def prompts_for(n: int) -> list[str]:
    """Class i % 10, phrasing (i // 10) % len(TEMPLATES): every class equally, in every phrasing."""
    return [TEMPLATES[(i // 10) % len(TEMPLATES)].format(a=CLASS_PHRASES[i % 10][0], p=CLASS_PHRASES[i % 10][1])
            for i in range(n)]


@torch.no_grad()
def generate(pipe, prompts: list[str], steps: int, guidance: float, batch: int, seed: int) -> torch.Tensor:
    out = []
    for i in range(0, len(prompts), batch):
        gen = torch.Generator().manual_seed(seed + i)
        imgs = pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
                    generator=gen).images
        out.append(imgs.float().cpu())
    return torch.cat(out)


def grid(images: torch.Tensor, rows: int, cols: int, path: Path, scale: int = 2) -> None:
    """images (rows*cols, 3, H, W) in [-1, 1] laid out row-major as one PNG, upscaled `scale` times."""
    from PIL import Image

    x = ((images[: rows * cols].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    _, c, h, w = x.shape
    canvas = x.reshape(rows, cols, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, c)
    Image.fromarray(canvas.numpy()).resize((cols * w * scale, rows * h * scale), Image.Resampling.NEAREST).save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, default=Path("runs/mini-sd-teacher"), help="teacher folder (trained "
                    "there if missing; its cache/ makes reruns cheap)")
    ap.add_argument("--preset", default=None, help="a YAML changing keys of configs/mini-sd.yaml")
    ap.add_argument("--n", type=int, default=1000, help="generated images per row")
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the preset's)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    overrides = {"threads": args.threads} if args.threads else {}
    cfg = load_minisd_config(args.preset, **overrides)
    summary = train_mini_teacher(cfg, args.teacher)
    torch.set_num_threads(cfg.threads or torch.get_num_threads())

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(args.teacher))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    test = load_fashion("test")
    metrics = ClassifierMetrics.load(args.teacher / "classifier", real=test.pixels())
    train = load_fashion("train")
    pick = torch.randperm(train.images.shape[0], generator=torch.Generator().manual_seed(0))[: args.n]
    real_x, real_y = train.pixels()[pick], train.labels[pick]
    rows = [{"sampler": "real training images (reference)", "steps": None, "guidance": None,
             "fd": metrics.fd(real_x), "prompt_accuracy": metrics.accuracy(real_x, real_y), "seconds": None}]
    prompts = prompts_for(args.n)
    samples = {}
    for steps in (32, 4):
        for guidance in (1.0, 4.0):
            started = time.perf_counter()
            imgs = to_classifier_input(generate(pipe, prompts, steps, guidance, args.batch, seed=1), metrics.size)
            seconds = time.perf_counter() - started
            samples[(steps, guidance)] = imgs
            rows.append({"sampler": "DDIM trailing", "steps": steps, "guidance": guidance, "fd": metrics.fd(imgs),
                         "prompt_accuracy": metrics.prompt_accuracy(imgs, prompts), "seconds": round(seconds, 1)})
            print(json.dumps(rows[-1]), flush=True)
    result = {"teacher": str(args.teacher), "n_generated": args.n, "n_heldout": int(test.images.shape[0]),
              "classifier_heldout_accuracy": summary.get("classifier_heldout_accuracy"),
              "train": {k: summary[k] for k in ("train_seconds", "train_seconds_total", "torch_threads", "n_train",
                                                 "scaling_factor", "vae_reconstruction_mse", "vae_parameters",
                                                 "text_encoder_parameters", "unet_parameters", "latent_shape")},
              "load_average_1min": os.getloadavg()[0], "rows": rows, "config": summary["config"]}
    md = write_results(args.results / "mini_sd_teacher", result, markdown)
    # one row per class, 10 samples each (DDIM-32 at guidance 4): sample i has class i % 10
    best, cols = samples[(32, 4.0)], min(10, args.n // 10)
    order = torch.cat([torch.arange(c, 10 * cols, 10) for c in range(10)])
    grid(best[order], 10, cols, args.results / "mini_sd_teacher.png")
    print(md)


def markdown(r: dict) -> str:
    t = r["train"]
    lines = [
        "# Mini Stable Diffusion teacher (Fashion-MNIST, 32x32)",
        "",
        f"Generated {r['n_generated']} images per row (every class equally, all caption phrasings); FD on the "
        f"classifier's features against the {r['n_heldout']} held-out test images; prompt accuracy = the classifier "
        f"agrees with the class the prompt names (classifier held-out accuracy "
        f"{r['classifier_heldout_accuracy']:.3f}: the ceiling). Sampler: diffusers' DDIMScheduler.from_config("
        f"pipe.scheduler.config, timestep_spacing=\"trailing\").",
        "",
        "| sampler | steps | guidance | FD ↓ | prompt accuracy ↑ | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        cells = [row["sampler"], row["steps"] or "", row["guidance"] or "", f"{row['fd']:.2f}",
                 f"{row['prompt_accuracy']:.3f}", row["seconds"] or ""]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    secs = ", ".join(f"{k} {v:.0f} s" for k, v in t["train_seconds"].items())
    lines += ["", f"Training: {t['train_seconds_total']:.0f} s in all ({secs}) at {t['torch_threads']} torch "
                  f"thread(s); {t['n_train']} training images; latents {t['latent_shape']}, scaling_factor "
                  f"{t['scaling_factor']:.4f}; VAE reconstruction MSE {t['vae_reconstruction_mse']:.4f} (pixels in "
                  f"[-1, 1]); parameters: VAE {t['vae_parameters']:,}, text encoder {t['text_encoder_parameters']:,}, "
                  f"UNet {t['unet_parameters']:,}. Load average when scored: {r['load_average_1min']:.1f}.", "",
              "Regenerate: `.venv/bin/python benchmarks/mini_sd_teacher.py` (trains the teacher into "
              "runs/mini-sd-teacher, or loads it from its cache).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
