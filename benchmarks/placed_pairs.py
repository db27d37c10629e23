"""Teacher pairs on the placed DDIM-32 grid: one batched solve over every window against one solve per window.

`make_window_pairs` with `TeacherSolver(mode="placed")` solves a batch that mixes K windows. Each window at the
teacher's timesteps takes the same number of grid steps (32 / K), so the batch is solved at once, each sample on its
own window's grid: 32 / K UNet calls on the whole batch instead of 32 calls on about batch / K samples each. This
times both on the mini Stable Diffusion's UNet (or a random one of its shape), side by side, median of --repeats, and
checks that they make the same pairs.

    .venv/bin/python benchmarks/placed_pairs.py     # -> benchmarks/results/placed_pairs.{json,md}
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from proreflow.fields import VPSchedule, VPVelocity, trailing_grid
from proreflow.pairs import TeacherSolver, make_window_pairs
from proreflow.schedulers.proreflow import timestep_windows
from proreflow.store import atomic_write_text
from results_io import write_results

RESULTS = Path(__file__).parent / "results"


def per_window(teacher, x0, schedule, solver, cond, windows, noise):
    """The former path: one solve per window present (still what unequal grids take)."""
    x_b = torch.empty_like(x0)
    for w in torch.unique(windows).tolist():
        m = windows == w
        x_b[m] = make_window_pairs(teacher, x0[m], schedule, solver, cond={k: v[m] for k, v in cond.items()},
                                   windows=windows[m], noise=noise[m]).x_b
    return x_b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, default=Path("runs/mini-sd-teacher"))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "placed_pairs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers import DDIMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(args.teacher / "unet")).eval()
    sched = DDIMScheduler.from_pretrained(str(args.teacher / "scheduler"))
    vp = VPSchedule.from_scheduler(sched)
    teacher = VPVelocity(unet, vp)
    solver = TeacherSolver("euler", 32, "placed").placed_at(trailing_grid(vp, 32))
    size, ch = unet.config.sample_size, unet.config.in_channels
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(args.batch, ch, size, size, generator=gen), torch.randn(args.batch, ch, size, size, generator=gen)
    cond = {"encoder_hidden_states": torch.randn(args.batch, 8, unet.config.cross_attention_dim, generator=gen)}
    rows = []
    for k in (8, 4, 2):
        schedule = timestep_windows(sched.config, k)
        windows = torch.arange(args.batch) % k
        times = {"batched": [], "per window": []}
        with torch.no_grad():
            for _ in range(args.repeats):  # side by side, alternating
                for name in times:
                    started = time.perf_counter()
                    if name == "batched":
                        out = make_window_pairs(teacher, x0, schedule, solver, cond=cond, windows=windows, noise=noise).x_b
                    else:
                        ref = per_window(teacher, x0, schedule, solver, cond, windows, noise)
                    times[name].append(time.perf_counter() - started)
        diff = float((out - ref).abs().max() / ref.abs().max())
        rows.append({"windows": k, "batch": args.batch, "unet_calls_batched": 32 // k, "unet_calls_per_window": 32,
                     **{f"seconds_{n.replace(' ', '_')}": statistics.median(v) for n, v in times.items()},
                     "max_abs_diff_over_max": diff})
        rows[-1]["speedup"] = rows[-1]["seconds_per_window"] / rows[-1]["seconds_batched"]
        print(json.dumps(rows[-1]), flush=True)
    result = {"teacher": str(args.teacher), "threads": args.threads, "repeats": args.repeats, "rows": rows}
    write_results(args.out, result)  # the numbers first, then the md below
    lines = ["# Placed teacher pairs: one batched solve against one solve per window", "",
             f"Teacher: {args.teacher} (its UNet, DDIM-32's trailing grid), batch {args.batch} spread evenly over the "
             f"windows, {args.threads} threads, median of {args.repeats} side-by-side runs.", "",
             "| windows | UNet calls (batched / per window) | batched s | per window s | speed-up | max diff / max |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['windows']} | {r['unet_calls_batched']} / {r['unet_calls_per_window']} | "
                     f"{r['seconds_batched']:.3f} | {r['seconds_per_window']:.3f} | {r['speedup']:.2f}x | "
                     f"{r['max_abs_diff_over_max']:.1e} |")
    lines += ["", "Regenerate: `.venv/bin/python benchmarks/placed_pairs.py`.", ""]
    atomic_write_text(args.out.with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
