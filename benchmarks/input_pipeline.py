"""Input pipeline of `proreflow distill --stream`: samples per second and peak host memory against the number of
webdataset shards, on CPU with a tiny random-weight SD pipeline (so the input side, not the UNet, is measured).

Each point is a fresh process that distils for exactly one epoch of the shards (budget = samples / batch),
reading them with 2 DataLoader workers: samples/s is the epoch's samples over the wall time of `run_distill`
(pipeline load excluded), peak RSS is the main process's plus the largest worker's (`ru_maxrss`). Streaming
holds one shard per worker, so the peak should not grow with the number of shards; an in-memory loader's
would.

    python benchmarks/input_pipeline.py                      # 5, 10 and 20 shards of 32 images (about 2 minutes)
    python benchmarks/input_pipeline.py --shards 2,4 --per-shard 8 --out /tmp/ip   # a quick check of the script
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent


def child(args: argparse.Namespace) -> None:
    """One measurement, in its own process: distil one epoch of `args.data` and print the numbers as JSON."""
    import gc

    from proreflow.apps.sd import load_distill_config, run_distill

    cfg = load_distill_config(args.preset)
    started = time.perf_counter()
    summary = run_distill(cfg, Path(args.out_dir), data=args.data, stream=True, data_workers=2, progress=False)
    seconds = time.perf_counter() - started
    gc.collect()  # the workers have ended: their peak is in RUSAGE_CHILDREN
    print(json.dumps({"seconds": seconds, "steps": summary["optimizer_steps"],
                      "rss_main_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_worker_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))


def _png(i: int, size: int) -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(i).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", default="5,10,20", help="shard counts to measure")
    ap.add_argument("--per-shard", type=int, default=32, help="images per shard")
    ap.add_argument("--image-size", type=int, default=128, help="stored image size in pixels (random PNG)")
    ap.add_argument("--resolution", type=int, default=32, help="training resolution (the tiny UNet attends at full size)")
    ap.add_argument("--batch", type=int, default=8, help="global batch (one process)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--preset", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return {}
    from proreflow.data.stream import write_shards
    from proreflow.models.sd_shapes import tiny_pipeline

    counts = [int(c) for c in args.shards.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiny_pipeline(root / "parts").save_pretrained(root / "teacher")
        images = [(_png(i, args.image_size), f"a photo of a cat {i}") for i in range(max(counts) * args.per_shard)]
        for n in counts:
            data = root / f"shards-{n}"
            write_shards(images[:n * args.per_shard], data, args.per_shard)
            samples = n * args.per_shard
            preset = root / f"preset-{n}.yaml"
            preset.write_text(
                f"model: {root / 'teacher'}\nresolution: {args.resolution}\nsteps: 2\n"
                f"method: {{name: proreflow, windows: '4->k'}}\nbudget_steps: {samples // args.batch}\n"
                "teacher_solver: {method: euler, steps: 2}\ngradient_checkpointing: false\n"
                f"train: {{batch_size: {args.batch}, per_device_batch: null, mixed_precision: 'no', warmup_steps: 0,"
                " progress: false}\n")
            proc = subprocess.run([sys.executable, __file__, "--child", "--preset", str(preset), "--data", str(data),
                                   "--out-dir", str(root / f"student-{n}")], capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            m = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append({"shards": n, "samples": samples, "samples_per_s": round(samples / m["seconds"], 1),
                         "rss_main_mib": round(m["rss_main_mib"], 1), "rss_worker_mib": round(m["rss_worker_mib"], 1),
                         "rss_peak_mib": round(m["rss_main_mib"] + m["rss_worker_mib"], 1)})
            print(rows[-1], flush=True)
    spread = max(r["rss_peak_mib"] for r in rows) / min(r["rss_peak_mib"] for r in rows) - 1
    result = {"rows": rows, "peak_rss_spread": round(spread, 4), "per_shard": args.per_shard,
              "image_size": args.image_size, "resolution": args.resolution, "batch": args.batch,
              "median_samples_per_s": statistics.median(r["samples_per_s"] for r in rows)}
    from results_io import write_results  # here, not at the top: the measured child imports this module too

    from proreflow.store import atomic_write_text

    write_results(args.out / "input_pipeline", result, indent=2)  # the numbers first, then the md below
    lines = ["# Input pipeline: `proreflow distill --stream`, tiny random-weight SD pipeline, CPU", "",
             f"One epoch of {args.per_shard} random {args.image_size} px PNG images per webdataset shard, trained at "
             f"{args.resolution} px, global batch {args.batch}, 2 DataLoader workers, one process. Peak RSS: main "
             f"process + largest worker. Generated by `python benchmarks/input_pipeline.py`.", "",
             "| shards | samples | samples/s | peak RSS main (MiB) | peak RSS worker (MiB) | peak RSS total (MiB) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['shards']} | {r['samples']} | {r['samples_per_s']} | {r['rss_main_mib']} | {r['rss_worker_mib']} | "
              f"{r['rss_peak_mib']} |" for r in rows]
    lines += ["", f"Largest over smallest peak RSS: {100 * spread:+.1f} %."]
    atomic_write_text(args.out / "input_pipeline.md", "\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()
