"""The paper's Table 4 in miniature on the mini Stable Diffusion: ProReflow-I with and without its two ideas, run as
an SD user runs it (issue 24, docs/mini-sd.md).

Four variants of `configs/mini-sd-proreflow-I.yaml` (the velocity MSE, 400 optimizer steps at batch 64 for all, so
every variant gets the same budget), each at training seeds 0 and 1, each distilled by `proreflow distill` in a fresh
process and opened with stock `StableDiffusionPipeline.from_pretrained`:

| variant | windows | lambda |
|---|---|---|
| full (the preset) | 8 -> 4 | 1 |
| w/o aligned | 8 -> 4 | 0 |
| w/o progressive | 4 (one stage) | 1 |
| w/o both (PeRFlow) | 4 (one stage) | 0 |

Each student samples at 4 steps, at guidance 1 and at guidance 4 (Table 4's scale). It is scored by FD on the
teacher's classifier features to the 10k held-out images, by prompt accuracy, and by fidelity (pixel RMSE to the
teacher's DDIM-32 images from the same noise and prompts). The full variant's students are the ones
`benchmarks/mini_sd_distill.py` trains (`runs/mini-sd-students/velocity{,-seed1}`); the others go to
`runs/mini-sd-ablations/`.

    .venv/bin/python benchmarks/mini_sd_ablations.py     # writes benchmarks/results/mini_sd_ablations.{json,md}
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from mini_sd_distill import distill, generate, open_pipe, score  # noqa: E402
from mini_sd_teacher import prompts_for  # noqa: E402

from proreflow.data.fashion import load_fashion, write_image_folder  # noqa: E402
from proreflow.metrics_classifier import ClassifierMetrics  # noqa: E402
from proreflow.store import atomic_write_text  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SEEDS = (0, 1)
#: variant -> what it changes in the preset (all share the preset's budget, batch, pairs and time sampling)
VARIANTS = {
    "full": {},
    "w/o aligned": {"method": {"lam": 0.0}},
    "w/o progressive": {"method": {"windows": "k"}},
    "w/o both (PeRFlow)": {"method": {"windows": "k", "lam": 0.0}},
}
SCOPES = {"full": "velocity", "w/o aligned": "no-aligned", "w/o progressive": "no-progressive",
          "w/o both (PeRFlow)": "perflow"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, default=Path("runs/mini-sd-teacher"))
    ap.add_argument("--data", type=Path, default=Path("runs/mini-sd-data"))
    ap.add_argument("--students", type=Path, default=Path("runs/mini-sd-students"), help="the full variant's")
    ap.add_argument("--out", type=Path, default=Path("runs/mini-sd-ablations"), help="the other variants' students")
    ap.add_argument("--n", type=int, default=500, help="generated images per row")
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not (args.teacher / "model_index.json").is_file():
        raise SystemExit(f"error: no mini teacher in {args.teacher}; run benchmarks/mini_sd_teacher.py first")
    if not args.data.is_dir():
        write_image_folder(args.data, split="train", limit=10000, seed=0)
    students: dict[tuple[str, int], tuple[Path, float]] = {}
    for name, changes in VARIANTS.items():
        for seed in SEEDS:
            root = args.students if name == "full" else args.out
            scope = SCOPES[name] + ("-seed1" if seed else "")
            students[(name, seed)] = distill(f"{name}, seed {seed}", scope, {**changes, "train": {"seed": seed}}
                                             if seed else changes, args.teacher, args.data, root, args.threads)

    metrics = ClassifierMetrics.load(args.teacher / "classifier", real=load_fashion("test").pixels())
    prompts = prompts_for(args.n)
    pipe = open_pipe(args.teacher, ddim_trailing=True)
    rows = []
    for guidance in (1.0, 4.0):
        ref, _ = generate(pipe, prompts, 32, guidance, args.batch)
        ddim4, _ = generate(pipe, prompts, 4, guidance, args.batch)
        rows.append({"variant": "teacher DDIM-4", "seed": None, "guidance": guidance,
                     **score(metrics, ddim4, prompts, ref)})
        for (name, seed), (folder, _) in students.items():
            imgs, _ = generate(open_pipe(folder), prompts, 4, guidance, args.batch)
            rows.append({"variant": name, "seed": seed, "guidance": guidance, **score(metrics, imgs, prompts, ref)})
            print(json.dumps(rows[-1]), flush=True)
    result = {"n_generated": args.n, "seeds": list(SEEDS), "rows": rows,
              "distill_seconds": {f"{n}, seed {s}": round(t, 1) for (n, s), (_, t) in students.items()}}
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.results / "mini_sd_ablations.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(args.results / "mini_sd_ablations.md", markdown(result))
    print(markdown(result))


def _mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"


def markdown(r: dict) -> str:
    lines = ["# Table 4 in miniature: ProReflow-I's two ideas on the mini Stable Diffusion", "",
             f"4-step students, {r['n_generated']} images per row, equal budget (400 optimizer steps at batch 64), "
             f"velocity MSE; mean ± std over training seeds {r['seeds']}. FD: the teacher's classifier features "
             "against the 10k held-out images; fidelity: pixel RMSE (in [0, 1]) to the teacher's DDIM-32 images "
             "from the same noise and prompts.", "",
             "| variant | guidance | FD ↓ | prompt accuracy ↑ | fidelity RMSE ↓ |", "|---|---|---|---|---|"]
    for g in (1.0, 4.0):
        for name in ["teacher DDIM-4", *VARIANTS]:
            xs = [x for x in r["rows"] if x["variant"] == name and x["guidance"] == g]
            if not xs:
                continue
            fd = [x["fd"] for x in xs]
            fd_s = f"{statistics.mean(fd):.3f} ± {statistics.stdev(fd):.3f}" if len(fd) > 1 else f"{fd[0]:.3f}"
            lines.append(f"| {name} | {g:g} | {fd_s} | {_mean_std([x['prompt_accuracy'] for x in xs])} | "
                         f"{_mean_std([x['fidelity_rmse'] for x in xs])} |")
    lines += ["", "Distillation wall time per student: " + ", ".join(f"{k}: {v / 60:.1f} min"
                                                                   for k, v in r["distill_seconds"].items()) + ".",
              "", "Regenerate: `.venv/bin/python benchmarks/mini_sd_ablations.py` (after benchmarks/mini_sd_teacher.py "
              "and benchmarks/mini_sd_distill.py, whose two preset students are the `full` rows)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
