"""The curves a `proreflow distill` run logs, drawn from its TensorBoard event files (docs/monitoring.md): the figure
that stands for a TensorBoard screenshot, made from the same events `tensorboard --logdir OUT/logs` shows.

    .venv/bin/python benchmarks/monitor_curves.py runs/mini-sd-students/velocity [--out benchmarks/results/mini_sd_curves]

The default run is the mini Stable Diffusion's ProReflow-I student that `benchmarks/mini_sd_distill.py` trains
(`--validate-every 50`). Writes <out>.png (loss terms, learning rate, per-window MSE and cosine, validation fidelity)
and <out>.md (the last value of each curve per stage).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of a run's TensorBoard logs as (step, value) lists, with TensorBoard's own purge of points a
    resumed run logged again."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, nargs="?", default=Path("runs/mini-sd-students/velocity"),
                    help="a distill output folder (its logs/distill holds the events)")
    ap.add_argument("--out", type=Path, default=RESULTS / "mini_sd_curves")
    args = ap.parse_args()
    logs = args.run / "logs" / "distill"
    if not logs.is_dir():
        raise SystemExit(f"error: no TensorBoard logs in {logs}; run `proreflow distill ... --report-to tensorboard`")
    s = read_scalars(logs)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pictures = sorted((args.run / "validation" / "distill").glob("step-*.png"))
    fig = plt.figure(figsize=(13, 9.5 if pictures else 6.5))
    grid = fig.add_gridspec(3 if pictures else 2, 3, height_ratios=[1, 1, 0.8][: 3 if pictures else 2])
    axes = np.array([[fig.add_subplot(grid[r, c]) for c in range(3)] for r in range(2)])
    panels = [("loss and its terms", ["train/loss", "train/mse", "train/direction"], "log"),
              ("learning rate", ["train/lr"], "linear"),
              ("validation: fidelity RMSE to the teacher", ["validation/fidelity_rmse"], "linear"),
              ("per-window velocity MSE", sorted(t for t in s if t.startswith("window_mse/")), "log"),
              ("per-window cosine to the target", sorted(t for t in s if t.startswith("window_cos/")), "linear"),
              ("gradient norm", ["train/grad_norm"], "log")]
    stages = sorted({v for _, v in s.get("train/stage", [])})
    stage_ends = [max(st for st, v in s["train/stage"] if v == k) for k in stages[:-1]]  # last step of each stage
    cmap = plt.get_cmap("viridis")
    for ax, (title, tags, scale) in zip(axes.flat, panels):
        for tag in tags:
            if tag in s:
                xs, ys = zip(*s[tag])
                style = {}
                if tag.startswith("window_"):  # window i of K: colour from noisy (dark) to clean (light)
                    k, i = (int(x) for x in tag.split("/")[1][1:].split("_w"))
                    style = {"color": cmap((i - 1) / max(k - 1, 1) * 0.9), "ls": "-" if k == min(
                        int(t.split("/")[1][1:].split("_w")[0]) for t in tags) else "--"}
                ax.plot(xs, ys, label=tag.split("/", 1)[1], lw=1.2, **style)
        for x in stage_ends:
            ax.axvline(x + 0.5, color="0.6", ls=":", lw=1)
        ax.set_title(title, fontsize=10)
        ax.set_yscale(scale)
        ax.set_xlabel("optimizer step (all stages)")
        if len(tags) > 1:
            ax.legend(fontsize=7, ncol=2)
    if pictures:  # the last validation render: the student's row over the teacher's, from the same noise
        from PIL import Image

        ax = fig.add_subplot(grid[2, :])
        ax.imshow(np.asarray(Image.open(pictures[-1])), interpolation="nearest")
        ax.set_title(f"validation at step {int(pictures[-1].stem.split('-')[1])}: EMA student (top) over the teacher "
                     f"(bottom), same noise and prompts", fontsize=10)
        ax.axis("off")
    fig.suptitle(f"{args.run}: the curves TensorBoard shows (dotted: a new stage; per window: dark = noisiest, "
                 f"dashed = earlier stage)", fontsize=11)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out.with_suffix(".png"), dpi=110)

    per_stage: dict[int, dict[str, float]] = defaultdict(dict)
    stage_of = dict(s.get("train/stage", []))
    for tag, points in s.items():
        for step, value in points:
            k = stage_of.get(step) or max((v for st, v in s.get("train/stage", []) if st <= step), default=1)
            per_stage[int(k)][tag] = value  # the last point of the stage
    tags = [t for t in ("train/loss", "train/mse", "train/direction", "validation/fidelity_rmse") if t in s]
    lines = [f"# Curves of `{args.run}` (last point of each stage)", "", "| stage | " + " | ".join(tags) +
             " | per-window MSE | per-window cosine |", "|---" * (len(tags) + 3) + "|"]
    for k in sorted(per_stage):
        row = per_stage[k]
        mse = ", ".join(f"{row[t]:.4f}" for t in sorted(row) if t.startswith("window_mse/"))
        cos = ", ".join(f"{row[t]:.4f}" for t in sorted(row) if t.startswith("window_cos/"))
        lines.append(f"| {k} | " + " | ".join(f"{row.get(t, float('nan')):.4f}" for t in tags) + f" | {mse} | {cos} |")
    lines += ["", f"Regenerate: `.venv/bin/python benchmarks/monitor_curves.py {args.run}`."]
    from proreflow.store import atomic_write_text

    atomic_write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print(f"wrote {args.out.with_suffix('.png')} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
