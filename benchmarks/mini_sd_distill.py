"""The main job on a trained SD-shaped teacher, run as an SD user runs it (docs/mini-sd.md):

1. the mini Stable Diffusion teacher (`proreflow mini-teacher`, cached) and its training images as a folder;
2. `proreflow distill --preset mini-sd-proreflow-I --model <teacher> --data <images>` (timed): the preset (velocity
   MSE) and the eps-space MSE (`method.loss_weighting: output`, the old default) at two seeds each, and the eps-space
   MSE with a warm-up per stage (`train.warmup_scope: stage`, the old rule); each logs its curves to TensorBoard
   and validates every 50 steps (`benchmarks/monitor_curves.py` draws them, docs/monitoring.md);
3. each student opened with stock `StableDiffusionPipeline.from_pretrained` (its exported DDIMScheduler) and sampled
   at 4 steps, next to the teacher under diffusers' DDIM (trailing) at 4 and 32 steps, at guidance 1 and 4;
4. the conventions on the trained teacher: our sampler (`make_scheduler("proreflow")`) against diffusers' DDIM from
   the same noise at 4, 8 and 32 steps, and what the old pure-noise entry (1.066 eps at t = 1) did to its images.

Columns: FD on the teacher's classifier features to the 10k held-out images, prompt accuracy, fidelity (RMSE in
pixels to the teacher's DDIM-32 images from the same noise and prompts), seconds per image (median of 3 timed
batches, side by side).

    .venv/bin/python benchmarks/mini_sd_distill.py      # writes benchmarks/results/mini_sd_distill.{json,md,png}
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from mini_sd_teacher import grid, prompts_for  # noqa: E402
from results_io import write_results  # noqa: E402

from proreflow.apps.minisd import load_minisd_config, train_mini_teacher  # noqa: E402
from proreflow.config import PRESET_DIR  # noqa: E402
from proreflow.data.fashion import load_fashion, write_image_folder  # noqa: E402
from proreflow.metrics_classifier import ClassifierMetrics, to_classifier_input  # noqa: E402
from proreflow.store import atomic_write_text  # noqa: E402

RESULTS = Path(__file__).parent / "results"
EPS = {"method": {"loss_weighting": "output"}}
# row name -> (student folder under --students, what the variant changes in the preset); "seed 1" rows repeat the
# variant above them with another training seed (pairs, noise, time draws and data order all follow it)
VARIANTS = {
    "proreflow-I (velocity MSE, the preset)": ("velocity", {}),
    "proreflow-I (velocity MSE, the preset), seed 1": ("velocity-seed1", {"train": {"seed": 1}}),
    "proreflow-I (eps-space MSE)": ("run", EPS),
    "proreflow-I (eps-space MSE), seed 1": ("run-seed1", {**EPS, "train": {"seed": 1}}),
    "proreflow-I (eps-space MSE, warm-up per stage)": ("stage", {**EPS, "train": {"warmup_scope": "stage"}}),
}


def student_record(root: Path, scope: str) -> dict | None:
    """A finished student's record, {"seconds", "threads"} (records written before the thread count was kept: 2
    threads), or None while `root/scope` holds no finished student."""
    record = root / f"{scope}.time.json"
    if not ((root / scope / "model_index.json").is_file() and record.is_file()):
        return None
    return {"threads": 2, **json.loads(record.read_text())}


def distill(name: str, scope: str, changes: dict, teacher: Path, data: Path, root: Path,
            threads: int, pair_cache: Path | None = None) -> tuple[Path, float]:
    """`proreflow distill` in a fresh process, as a user runs it; (student folder, wall seconds). Finished runs are
    kept (their time from the first run's record). `pair_cache`: `--pair-cache`, shared by the runs that draw the
    same teacher pairs (the student is the same; the pairs are solved once)."""
    out = root / scope
    if (kept := student_record(root, scope)) is not None:
        return out, kept["seconds"]
    preset = yaml.safe_load((PRESET_DIR / "mini-sd-proreflow-I.yaml").read_text())
    for key, value in changes.items():  # a section's dict is merged into the preset's, a scalar replaces it
        preset[key] = {**preset.get(key, {}), **value} if isinstance(value, dict) else value
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{scope}.yaml"
    path.write_text(yaml.safe_dump(preset))
    resume = ["--resume", "latest"] if (out / "checkpoints").is_dir() else []
    cmd = [sys.executable, "-m", "proreflow.cli", "distill", "--preset", str(path), "--model", str(teacher),
           "--data", str(data), "--out", str(out), "--quiet", "--validate-every", "50",
           *(["--pair-cache", str(pair_cache)] if pair_cache else []), *resume]  # each run encodes --data, as a user's
    print(f"{name}: {' '.join(cmd)}", flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env={**__import__("os").environ, "OMP_NUM_THREADS": str(threads)})
    seconds = time.perf_counter() - started
    # the thread count is recorded: a student's numbers depend on it (benchmarks/results/lanes_speed.md)
    atomic_write_text(root / f"{scope}.time.json", json.dumps({"seconds": seconds, "threads": threads}) + "\n")
    return out, seconds


def open_pipe(folder: Path, ddim_trailing: bool = False):
    """A pipeline folder opened with stock `from_pretrained`, as a user opens it, progress bars off; with
    `ddim_trailing` (the teacher) under diffusers' DDIMScheduler, trailing spacing, final alpha 1."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if ddim_trailing:
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                                   set_alpha_to_one=True)
    return pipe


def score(metrics: ClassifierMetrics, imgs: torch.Tensor, prompts: list[str], ref: torch.Tensor) -> dict:
    """FD, prompt accuracy and fidelity (pixel RMSE to `ref`, the teacher's DDIM-32 images) of images in [0, 1]."""
    x = to_classifier_input(imgs, metrics.size)
    return {"fd": metrics.fd(x), "prompt_accuracy": metrics.prompt_accuracy(x, prompts),
            "fidelity_rmse": float((imgs - ref).pow(2).mean().sqrt())}


@torch.no_grad()
def generate(pipe, prompts: list[str], steps: int, guidance: float, batch: int, seed: int = 1,
             output_type: str = "pt") -> tuple[torch.Tensor, list[float]]:
    """Images (or latents) for `prompts` in batches, each batch from generator seed + start, and per-image seconds."""
    out, secs = [], []
    for i in range(0, len(prompts), batch):
        started = time.perf_counter()
        imgs = pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance, output_type=output_type,
                    generator=torch.Generator().manual_seed(seed + i)).images
        secs.append((time.perf_counter() - started) / len(prompts[i:i + batch]))
        out.append(imgs.float().cpu() if output_type == "pt" else imgs.float())
    return torch.cat(out), secs


def timed(pipe, prompts: list[str], steps: int, guidance: float) -> float:
    """Median seconds per image over 3 batches of 50 (every row alike, in one process)."""
    return statistics.median(generate(pipe, prompts[:150], steps, guidance, 50)[1])


def conventions(pipe, prompts: list[str]) -> dict:
    """Our sampler vs diffusers' DDIM on the trained teacher, from the same noise (latents), and the old entry."""
    from diffusers import DDIMScheduler

    from proreflow.fields import VPSchedule, VPVelocity
    from proreflow.sampling import sample
    from proreflow.schedulers import make_scheduler
    from proreflow.schedulers.proreflow import timestep_windows

    own = pipe.scheduler
    out: dict = {"ddim_equivalence": {}}
    for steps in (4, 8, 32):
        pipe.scheduler = DDIMScheduler.from_config(own.config, timestep_spacing="trailing", set_alpha_to_one=True)
        ref, _ = generate(pipe, prompts, steps, 1.0, len(prompts), output_type="latent")
        pipe.scheduler = make_scheduler("proreflow", own.config, steps)
        ours, _ = generate(pipe, prompts, steps, 1.0, len(prompts), output_type="latent")
        out["ddim_equivalence"][steps] = {"max_abs_over_max": float((ours - ref).abs().max() / ref.abs().max()),
                                          "rms_over_rms": float((ours - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())}
    pipe.scheduler = own
    # the old entry: a field without `noise_entry` starts at t = 1, so VPVelocity feeds (alpha + sigma) eps at 999
    field = VPVelocity(pipe.unet, VPSchedule.from_scheduler(own))
    emb = pipe.encode_prompt(prompts, "cpu", 1, False)[0]
    size = pipe.unet.config.sample_size
    noise = torch.randn(len(prompts), pipe.unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(1))
    decoded = {}
    with torch.no_grad():
        for label, f in (("entry x_999 = eps (now)", field), ("old entry 1.066 eps at t = 1",
                                                              lambda x, t, c=None: field(x, t, c))):
            for steps in (32, 4):
                lat = sample(f, noise, timestep_windows(own.config, steps), cond={"encoder_hidden_states": emb})
                decoded[(label, steps)] = pipe.vae.decode(lat / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)
    out["decoded"] = decoded
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, default=Path("runs/mini-sd-teacher"))
    ap.add_argument("--data", type=Path, default=Path("runs/mini-sd-data"), help="training images + captions (written "
                    "from Fashion-MNIST's training split if missing)")
    ap.add_argument("--images", type=int, default=10000, help="training images written to --data")
    ap.add_argument("--students", type=Path, default=Path("runs/mini-sd-students"))
    ap.add_argument("--n", type=int, default=1000, help="generated images per row")
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    teacher_summary = train_mini_teacher(load_minisd_config(), args.teacher)
    if not args.data.is_dir():
        write_image_folder(args.data, split="train", limit=args.images, seed=0)
    students = {name: distill(name, scope, changes, args.teacher, args.data, args.students, args.threads)
                for name, (scope, changes) in VARIANTS.items()}

    test = load_fashion("test")
    metrics = ClassifierMetrics.load(args.teacher / "classifier", real=test.pixels())
    prompts = prompts_for(args.n)
    pipe = open_pipe(args.teacher, ddim_trailing=True)
    rows, refs, shown = [], {}, {}
    for guidance in (1.0, 4.0):
        refs[guidance], _ = generate(pipe, prompts, 32, guidance, args.batch)
    pipes = {"teacher, DDIM trailing": pipe}
    for name, (folder, _) in students.items():
        pipes[name] = open_pipe(folder)
    for guidance in (1.0, 4.0):
        for name, p in pipes.items():
            for steps in ((32, 4) if name.startswith("teacher") else (4,)):
                imgs = refs[guidance] if steps == 32 else generate(p, prompts, steps, guidance, args.batch)[0]
                shown[(name, steps, guidance)] = imgs
                rows.append({"model": name, "scheduler": type(p.scheduler).__name__, "steps": steps,
                             "guidance": guidance, **score(metrics, imgs, prompts, refs[guidance]),
                             "seconds_per_image": timed(p, prompts, steps, guidance)})
                print(json.dumps(rows[-1]), flush=True)
    conv = conventions(pipe, prompts[:100])
    ref32 = conv["decoded"][("entry x_999 = eps (now)", 32)]
    old_rows = []
    for (label, steps), imgs in conv.pop("decoded").items():
        x = to_classifier_input(imgs, metrics.size, value_range=(-1.0, 1.0))
        old_rows.append({"entry": label, "steps": steps, "prompt_accuracy": metrics.prompt_accuracy(x, prompts[:100]),
                         "fidelity_rmse_to_now_32": float((imgs - ref32).pow(2).mean().sqrt() / 2)})  # [0, 1] units
    result = {"teacher": str(args.teacher), "teacher_train_seconds": teacher_summary.get("train_seconds_total"),
              "n_generated": args.n, "distill_seconds": {n: round(s, 1) for n, (_, s) in students.items()},
              "torch_threads": args.threads, "rows": rows, "conventions": conv, "entry_rows": old_rows}
    md = write_results(args.results / "mini_sd_distill", result, markdown)
    order = torch.cat([torch.arange(c, 80, 10) for c in range(10)])[:80]  # 8 samples of each class, one row a class
    panels = [shown[("teacher, DDIM trailing", 32, 4.0)], shown[("teacher, DDIM trailing", 4, 4.0)],
              shown[(next(iter(VARIANTS)), 4, 4.0)]]
    panels = [q * 2 - 1 for q in panels]  # grid() takes [-1, 1]
    grid(torch.cat([p[order].reshape(10, 8, *p.shape[1:]) for p in panels], dim=1).flatten(0, 1), 10, 24,
         args.results / "mini_sd_distill.png")
    print(md)


def markdown(r: dict) -> str:
    lines = ["# The main job on the mini Stable Diffusion", "",
             f"{r['n_generated']} images per row, every class equally; FD on the teacher's classifier features to "
             f"the 10k held-out images; fidelity: RMSE (pixels in [0, 1]) to the teacher's DDIM-32 images from the "
             f"same noise and prompts; seconds per image: median of 3 batches of 50 on {r['torch_threads']} threads.", "",
             "| model | scheduler | steps | guidance | FD ↓ | prompt accuracy ↑ | fidelity RMSE ↓ | s / image |",
             "|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        lines.append(f"| {x['model']} | {x['scheduler']} | {x['steps']} | {x['guidance']:g} | {x['fd']:.2f} | "
                     f"{x['prompt_accuracy']:.3f} | {x['fidelity_rmse']:.4f} | {x['seconds_per_image']:.4f} |")
    groups: dict = {}
    for x in r["rows"]:
        if x["model"].startswith("proreflow"):
            groups.setdefault((x["model"].split(", seed")[0], x["guidance"]), []).append(x)
    lines += ["", "Mean ± std over the seeds of each variant:", "",
              "| variant | guidance | seeds | FD ↓ | prompt accuracy ↑ | fidelity RMSE ↓ |", "|---|---|---|---|---|---|"]
    for (name, g), xs in groups.items():
        cell = lambda key, f: f"{statistics.mean(x[key] for x in xs):{f}}" + (
            f" ± {statistics.stdev(x[key] for x in xs):{f}}" if len(xs) > 1 else "")
        lines.append(f"| {name} | {g:g} | {len(xs)} | {cell('fd', '.2f')} | {cell('prompt_accuracy', '.3f')} | "
                     f"{cell('fidelity_rmse', '.4f')} |")
    lines += ["", "Distillation wall time (`proreflow distill`, fresh process, teacher pairs included): " +
              ", ".join(f"{k}: {v / 60:.1f} min" for k, v in r["distill_seconds"].items()) + ".", "",
              "Our sampler (`make_scheduler(\"proreflow\")`) against diffusers' DDIM trailing, same noise, trained "
              "teacher, latents:", "", "| steps | max abs diff / max | RMS diff / RMS |", "|---|---|---|"]
    for steps, e in r["conventions"]["ddim_equivalence"].items():
        lines.append(f"| {steps} | {e['max_abs_over_max']:.2e} | {e['rms_over_rms']:.2e} |")
    lines += ["", "Where pure noise enters (100 prompts, guidance 1, windows at the teacher's timesteps):", "",
              "| entry | steps | prompt accuracy | RMSE to the x_999 = eps entry at 32 steps |", "|---|---|---|---|"]
    for x in r["entry_rows"]:
        lines.append(f"| {x['entry']} | {x['steps']} | {x['prompt_accuracy']:.3f} | {x['fidelity_rmse_to_now_32']:.4f} |")
    lines += ["", "Regenerate: `.venv/bin/python benchmarks/mini_sd_distill.py`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
