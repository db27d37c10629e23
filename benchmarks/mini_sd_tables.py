"""The paper's Tables 1, 2 and 4 and Fig. 3 in miniature, on the trained mini Stable Diffusion, run as an SD user
runs them (issue 24, docs/mini-sd.md).

Every student is `configs/mini-sd-proreflow-I.yaml` with one change (the table below), distilled by
`proreflow distill` in a fresh process and opened with stock `StableDiffusionPipeline.from_pretrained`. Every
student gets the preset's budget (400 optimizer steps at batch 64) unless its row is about the budget.

| row | change to the preset | seeds |
|---|---|---|
| ProReflow-I (full) | none: 8 -> 4 windows, lambda 1 | 3 |
| w/o aligned | lambda 0 | 3 |
| w/o progressive | 4 windows, one stage | 3 |
| w/o both (PeRFlow) | 4 windows, lambda 0 | 3 |
| 2-rectified flow | 1 window, lambda 0 (sampled at 2 and 4 steps) | 2 (see below) |
| ProReflow-II | `steps: 2`: 8 -> 4 -> 2 windows (sampled at 2 and 4 steps) | 3 |
| lambda 0.1 / lambda 10 | the lambda sweep (0 and 1 are the rows above) | 1 |
| eps-weighted MSE, lambda 1 / 0 | `loss_weighting: output` (the MSE in the UNet's eps space) | 1 |
| guidance-distilled | pairs at teacher guidance 4, sampled at CFG 1 | 1 |
| previous-stage pairs | `pair_source: previous_stage` | 1 |
| full / PeRFlow at 200 steps | half the budget (warm-up 50, the same quarter) | 1 |

2-RF has 2 seeds, not the issue's 3: the one row cut to keep the whole command within 120 min on 2 cores. Its pairs
cost 32 teacher calls each (6 for ProReflow-I), 32 min a seed at 1 thread against 8.7 for ProReflow-I; with a third
seed the command came to an estimated 129 min at `--jobs 2` (docs/benchmarks.md).

Table 2 is the teacher under diffusers' solvers (DDIM at 32, 8 and 4 steps, DPM-Solver++ and UniPC at 4, all with
trailing timestep spacing). Every row is sampled at guidance 1 and 4; ProReflow-I, PeRFlow and the teacher's DDIM-4
also at guidance 1-7 (Fig. 3). Columns: FD on the teacher's classifier features to the 10k held-out images, prompt
accuracy, fidelity (pixel RMSE to the teacher's DDIM-32 images from the same noise and prompts), seconds per image
(median of 3 batches of 50, all rows timed alike in one process) and teacher / student UNet calls per training pair
(from the student's `proreflow.json`).

Students already distilled are reused (their folder and wall time are kept), so an interrupted run goes on where it
stopped. Every distill shares `--pair-cache` (runs/mini-sd-pairs): rows that draw the same teacher pairs (the lambda,
loss-weighting and budget rows of one seed, PeRFlow beside w/o progressive) solve them once and train the very
student they would train without it (tests/test_distill.py). `--only-trained` scores the students that exist without
training the others (the report names the missing).

    .venv/bin/python benchmarks/mini_sd_tables.py --jobs 2   # writes benchmarks/results/mini_sd_tables.{json,md,png}
                                                             # and mini_sd_guidance.png (115 min from empty caches)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from lanes import Job, run_lanes  # noqa: E402
from mini_sd_distill import distill, generate, open_pipe, score, student_record, timed  # noqa: E402
from mini_sd_teacher import grid, prompts_for  # noqa: E402
import results_io  # noqa: E402
from results_io import write_results  # noqa: E402

from proreflow.data.fashion import load_fashion, write_image_folder  # noqa: E402
from proreflow.metrics_classifier import ClassifierMetrics  # noqa: E402
from proreflow.store import atomic_write_text  # noqa: E402

RESULTS = Path(__file__).parent / "results"
GUIDANCES = (1.0, 4.0)
SWEEP = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0)


@dataclass(frozen=True)
class Student:
    """One row: a change to the preset, where its students live (`root/scope`, `scope-seed<s>` for seed s > 0)."""

    name: str
    table: str
    root: str
    scope: str
    changes: dict = field(default_factory=dict)
    seeds: tuple[int, ...] = (0,)
    steps: tuple[int, ...] = (4,)
    guidances: tuple[float, ...] = GUIDANCES
    #: the row (same seed) whose teacher pairs this one loads from `--pair-cache`: with `--jobs` > 1 it starts after
    #: that row has finished instead of solving the same pairs beside it (a scheduling hint: the student is the same)
    pairs_from: str | None = None

    def folder_scope(self, seed: int) -> str:
        return self.scope + (f"-seed{seed}" if seed else "")

    def seed_changes(self, seed: int) -> dict:
        if not seed:
            return self.changes
        return {**self.changes, "train": {**self.changes.get("train", {}), "seed": seed}}


THREE = (0, 1, 2)
#: `--seeds 1` or `--seeds 2` trains and scores only the first one or two seeds of the three-seed rows
EPS = {"loss_weighting": "output"}
FULL = "ProReflow-I (full)"
LONGEST = "2-rectified flow"
# the full variant's seeds 0/1 and the eps-weighted lambda-1 student are those benchmarks/mini_sd_distill.py trains
STUDENTS = (
    Student(FULL, "1, 4", "mini-sd-students", "velocity", seeds=THREE),
    Student("w/o aligned", "4", "mini-sd-ablations", "no-aligned", {"method": {"lam": 0.0}}, THREE, pairs_from=FULL),
    Student("w/o progressive", "4", "mini-sd-ablations", "no-progressive", {"method": {"windows": "k"}}, THREE),
    Student("w/o both (PeRFlow)", "1, 4", "mini-sd-ablations", "perflow", {"method": {"windows": "k", "lam": 0.0}},
            THREE, pairs_from="w/o progressive"),
    # 2-RF solves the whole trajectory for every pair (32 teacher calls, against 6 for ProReflow-I), shared with no
    # other row: the longest distillation, and the row cut to 2 seeds to keep the command within 120 min
    Student("2-rectified flow", "1", "mini-sd-tables", "2rf", {"method": {"windows": [1], "lam": 0.0}}, (0, 1),
            (2, 4)),
    Student("ProReflow-II", "1", "mini-sd-tables", "proreflow-II", {"steps": 2}, THREE, (2, 4), pairs_from=FULL),
    Student("lambda 0.1", "lambda", "mini-sd-tables", "lam0.1", {"method": {"lam": 0.1}}, pairs_from=FULL),
    Student("lambda 10", "lambda", "mini-sd-tables", "lam10", {"method": {"lam": 10.0}}, pairs_from=FULL),
    Student("eps-weighted MSE, lambda 1", "weighting", "mini-sd-students", "run", {"method": EPS}, pairs_from=FULL),
    Student("eps-weighted MSE, lambda 0", "weighting", "mini-sd-tables", "eps-no-aligned",
            {"method": {**EPS, "lam": 0.0}}, pairs_from=FULL),
    Student("guidance-distilled (pairs at guidance 4)", "guidance", "mini-sd-tables", "teacher-g4",
            {"teacher_guidance": 4.0}, guidances=(1.0,)),
    Student("previous-stage pairs", "pairs", "mini-sd-tables", "previous-stage",
            {"method": {"pair_source": "previous_stage"}}, pairs_from=FULL),
    Student("full, 200 steps", "budget", "mini-sd-tables", "full-200",
            {"budget_steps": 200, "train": {"warmup_steps": 50}}, pairs_from=FULL),
    Student("PeRFlow, 200 steps", "budget", "mini-sd-tables", "perflow-200",
            {"method": {"windows": "k", "lam": 0.0}, "budget_steps": 200, "train": {"warmup_steps": 50}},
            pairs_from="w/o progressive"),
)
#: diffusers solvers on the teacher (Table 2): name -> (scheduler class, steps)
SOLVERS = (("DDIM", "DDIMScheduler", 32), ("DDIM", "DDIMScheduler", 8), ("DDIM", "DDIMScheduler", 4),
           ("DPM-Solver++", "DPMSolverMultistepScheduler", 4), ("UniPC", "UniPCMultistepScheduler", 4))
SWEPT = ("ProReflow-I (full)", "w/o both (PeRFlow)")


def command_line(argv: list[str]) -> str:
    """The command that writes these results (`--report-only` dropped: it only rewrites the md)."""
    return results_io.command_line("mini_sd_tables.py", argv, drop=("--report-only",))


def distill_order(seeds: int) -> list[tuple[int, Student]]:
    """(seed, row) in the order they are distilled: every row's seed 0 first, so a run cut short has one seed of every
    row; within a seed the rows that solve their own pairs first, 2-RF (the longest) before them, so that with
    `--jobs` > 1 no lane is left alone with it at the end."""
    order = [(seed, i, st) for i, st in enumerate(STUDENTS) for seed in st.seeds if seed < seeds]
    order.sort(key=lambda x: (x[0], x[2].pairs_from is not None, x[2].name != LONGEST, x[1]))
    return [(seed, st) for seed, _, st in order]


def timing(guidance: float, seed: int | None = None) -> bool:
    """Whether a row is timed: seed 0 (or the teacher) at the tables' guidances. The sweep's other guidances report FD
    and prompt accuracy only, and a guided step costs two UNet calls at any scale."""
    return guidance in GUIDANCES and not seed


def solver_pipe(teacher: Path, cls_name: str):
    """The teacher under one of diffusers' solvers, trailing spacing (DDIM with final alpha 1, as in Table 2)."""
    import diffusers

    pipe = open_pipe(teacher)
    extra = {"set_alpha_to_one": True} if cls_name == "DDIMScheduler" else {}
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                                              **extra)
    return pipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, default=Path("runs/mini-sd-teacher"))
    ap.add_argument("--data", type=Path, default=Path("runs/mini-sd-data"))
    ap.add_argument("--runs", type=Path, default=Path("runs"), help="students go to <runs>/<row's folder>/<scope>")
    ap.add_argument("--n", type=int, default=500, help="generated images per row")
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=1,
                    help="distillations run side by side, --threads // --jobs torch threads each (benchmarks/lanes.py; "
                         "a student's numbers depend on its thread count; the committed tables are at --jobs 2)")
    ap.add_argument("--only-trained", action="store_true", help="score the students that exist, train none")
    ap.add_argument("--seeds", type=int, default=3, choices=(1, 2, 3), help="training seeds of the three-seed rows")
    ap.add_argument("--pair-cache", type=Path, default=Path("runs/mini-sd-pairs"),
                    help="`proreflow distill --pair-cache` of every student: rows that draw the same teacher pairs "
                         "(lambda, weighting, budget) solve them once; the students are the same without it")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--report-only", action="store_true", help="rewrite the md and the sweep plot from the json")
    args = ap.parse_args()
    if args.report_only:
        result = json.loads((args.results / "mini_sd_tables.json").read_text())
        result.setdefault("command", command_line(sys.argv[1:]))  # results written before the json kept it
        plot_sweep(result, args.results / "mini_sd_guidance.png")
        atomic_write_text(args.results / "mini_sd_tables.md", markdown(result))
        return
    if not 1 <= args.jobs <= args.threads:  # a lane per thread at least: more would oversubscribe the cores
        raise SystemExit(f"error: --jobs must be between 1 and --threads ({args.threads}), got {args.jobs}")
    torch.set_num_threads(args.threads)
    if not (args.teacher / "model_index.json").is_file():
        raise SystemExit(f"error: no mini teacher in {args.teacher}; run benchmarks/mini_sd_teacher.py first")
    if not args.data.is_dir():
        write_image_folder(args.data, split="train", limit=10000, seed=0)
    started = time.perf_counter()
    missing: list[str] = []
    jobs: list[Job] = []
    by_name = {st.name: st for st in STUDENTS}
    for seed, st in distill_order(args.seeds):
        root, scope = args.runs / st.root, st.folder_scope(seed)
        if args.only_trained and student_record(root, scope) is None:
            missing.append(f"{st.name}, seed {seed}")
            continue
        jobs.append(Job((st.name, seed), (st.pairs_from, seed) if st.pairs_from else None))
    lane_threads = max(1, args.threads // args.jobs)  # the cores split between the lanes, never oversubscribed

    def run(job: Job) -> tuple[Path, float]:
        (name, seed), st = job.key, by_name[job.key[0]]
        return distill(f"{name}, seed {seed}", st.folder_scope(seed), st.seed_changes(seed), args.teacher, args.data,
                       args.runs / st.root, lane_threads, args.pair_cache)

    done_jobs = run_lanes(jobs, args.jobs, run)
    # scored row by row in STUDENTS' order, seed 0 first, whatever order they were distilled or finished in
    rank = {st.name: i for i, st in enumerate(STUDENTS)}
    trained = {key: done_jobs[key] for key in sorted(done_jobs, key=lambda k: (k[1], rank[k[0]]))}
    distilled_seconds = time.perf_counter() - started

    scoring_started = time.perf_counter()
    metrics = ClassifierMetrics.load(args.teacher / "classifier", real=load_fashion("test").pixels())
    prompts = prompts_for(args.n)
    rows: list[dict] = []
    shown: dict[str, torch.Tensor] = {}
    solver_pipes = {(label, steps): solver_pipe(args.teacher, cls) for label, cls, steps in SOLVERS}
    student_pipes = {key: open_pipe(folder) for key, (folder, _) in trained.items()}
    costs = {key: {k: json.loads((folder / "proreflow.json").read_text()).get(k)
                   for k in ("teacher_nfe_per_pair", "student_nfe_per_pair")}
             for key, (folder, _) in trained.items()}
    for guidance in sorted({*GUIDANCES, *SWEEP}):
        ref, _ = generate(solver_pipes[("DDIM", 32)], prompts, 32, guidance, args.batch)
        for (label, steps), pipe in solver_pipes.items():
            if guidance not in GUIDANCES and label != "DDIM" or guidance not in GUIDANCES and steps == 8:
                continue
            imgs = ref if (label, steps) == ("DDIM", 32) else generate(pipe, prompts, steps, guidance, args.batch)[0]
            rows.append({"row": f"teacher {label}-{steps}", "table": "2", "seed": None, "steps": steps,
                         "guidance": guidance, **score(metrics, imgs, prompts, ref),
                         "seconds_per_image": timed(pipe, prompts, steps, guidance) if timing(guidance) else None})
            if guidance == 4.0 and steps in (32, 4) and label == "DDIM":
                shown[rows[-1]["row"]] = imgs[:40]
            print(json.dumps(rows[-1]), flush=True)
        for (name, seed), pipe in student_pipes.items():
            st = by_name[name]
            if guidance not in st.guidances and not (name in SWEPT and seed == 0):
                continue
            for steps in st.steps:
                imgs, _ = generate(pipe, prompts, steps, guidance, args.batch)
                rows.append({"row": name, "table": st.table, "seed": seed, "steps": steps, "guidance": guidance,
                             **score(metrics, imgs, prompts, ref), **costs[(name, seed)],
                             "seconds_per_image": timed(pipe, prompts, steps, guidance) if timing(guidance, seed)
                             else None})
                if guidance == 4.0 and seed == 0 and steps == 4:
                    shown[name] = imgs[:40]
                print(json.dumps(rows[-1]), flush=True)
    result = {"n_generated": args.n, "grid_panels": list(shown), "torch_threads": args.threads, "rows": rows,
              "missing": missing,
              "distill_seconds": {f"{n}, seed {s}": round(t, 1) for (n, s), (_, t) in trained.items()},
              "distill_threads": sorted({student_record(folder.parent, folder.name)["threads"]
                                         for folder, _ in trained.values()}),
              "command": command_line(sys.argv[1:]), "seconds": round(time.perf_counter() - started, 1),
              "jobs": args.jobs, "lane_threads": lane_threads,
              "distill_wall_seconds": round(distilled_seconds, 1),
              "scoring_seconds": round(time.perf_counter() - scoring_started, 1)}
    md = write_results(args.results / "mini_sd_tables", result, markdown)  # the md again from the json: --report-only
    order = torch.cat([torch.arange(c, 40, 10) for c in range(10)])  # 4 samples of each class, a class a row
    panels = [p[order].reshape(10, 4, *p.shape[1:]) * 2 - 1 for p in shown.values()]
    grid(torch.cat(panels, dim=1).flatten(0, 1), 10, 4 * len(panels), args.results / "mini_sd_tables.png", scale=1)
    plot_sweep(result, args.results / "mini_sd_guidance.png")
    print(md)


def _agg(xs: list[dict], key: str, fmt: str) -> str:
    vals = [x[key] for x in xs if x.get(key) is not None]
    if not vals:
        return "-"
    return f"{statistics.mean(vals):{fmt}}" + (f" ± {statistics.stdev(vals):{fmt}}" if len(vals) > 1 else "")


def grouped(rows: list[dict], guidance: float) -> list[tuple[str, str, int, int, list[dict]]]:
    """(row, table, steps, n seeds, its rows) at one guidance, in the order the rows were scored."""
    out: dict = {}
    for x in rows:
        if x["guidance"] == guidance:
            out.setdefault((x["row"], x["table"], x["steps"]), []).append(x)
    return [(r, t, s, len(xs), xs) for (r, t, s), xs in out.items()]


def markdown(r: dict) -> str:
    head = ("| row | table | steps | seeds | FD ↓ | prompt accuracy ↑ | fidelity RMSE ↓ | s / image | "
            "teacher / student UNet calls per pair |")
    lines = ["# Tables 1, 2 and 4 and Fig. 3 in miniature on the mini Stable Diffusion", "",
             f"{r['n_generated']} images per row (every class equally), the same prompts and noise for every row. FD: "
             "the teacher's classifier features against the 10k held-out images. Fidelity: pixel RMSE (in [0, 1]) to "
             "the teacher's DDIM-32 images. Students: mean ± std over training seeds; equal budget (400 optimizer "
             "steps at batch 64) unless the row says otherwise. s / image: median of 3 batches of 50 on "
             f"{r['torch_threads']} threads (seed 0).", ""]
    for g in GUIDANCES:
        lines += [f"## Guidance {g:g}", "", head, "|---|---|---|---|---|---|---|---|---|"]
        for name, table, steps, n, xs in grouped(r["rows"], g):
            calls = "-" if xs[0].get("teacher_nfe_per_pair") is None else \
                f"{xs[0]['teacher_nfe_per_pair']:.1f} / {xs[0]['student_nfe_per_pair']:.1f}"
            lines.append(f"| {name} | {table} | {steps} | {n if xs[0]['seed'] is not None else '-'} | "
                         f"{_agg(xs, 'fd', '.2f')} | {_agg(xs, 'prompt_accuracy', '.3f')} | "
                         f"{_agg(xs, 'fidelity_rmse', '.4f')} | {_agg(xs, 'seconds_per_image', '.4f')} | {calls} |")
        lines.append("")
    lines += targets(r)
    lines += ["## Guidance sweep (Fig. 3; seed 0, 4 steps)", "", "| row | " + " | ".join(f"g {g:g}" for g in SWEEP)
              + " |", "|---|" + "---|" * len(SWEEP)]
    for name in ("teacher DDIM-32", "teacher DDIM-4", *SWEPT):
        cells = []
        for g in SWEEP:
            xs = [x for x in r["rows"] if x["row"] == name and x["guidance"] == g and x["seed"] in (None, 0)
                  and x["steps"] in (4, 32)]
            cells.append(f"{xs[0]['fd']:.2f}" if xs else "-")
        lines.append(f"| {name} (FD) | " + " | ".join(cells) + " |")
    lines += ["", "Distillation wall time per student (`proreflow distill`, fresh process, pairs included): " +
              ", ".join(f"{k}: {v / 60:.1f} min" for k, v in r["distill_seconds"].items()) + ".",
              f"Whole command: {r['seconds'] / 60:.1f} min (students already trained are reused, their time as first "
              "measured)."]
    if len(r.get("distill_threads", [])) > 1:
        lines += [f"Students trained at different torch thread counts ({r['distill_threads']}) are mixed in these "
                  "rows: a student's numbers depend on its thread count (`lanes_speed.md`)."]
    if r.get("jobs", 1) > 1:
        lines += [f"Distilled in {r['jobs']} lanes side by side (`--jobs {r['jobs']}`), {r['lane_threads']} torch "
                  f"thread(s) each: the distillations took {r['distill_wall_seconds'] / 60:.1f} min of wall time."]
    if "scoring_seconds" in r and r.get("jobs", 1) > 1:  # the students' times overlap: their sum is not the run's
        lines += [f"Scoring took {r['scoring_seconds'] / 60:.1f} min; the students' own times sum to "
                  f"{sum(r['distill_seconds'].values()) / 60:.1f} lane-minutes."]
    elif "scoring_seconds" in r:
        total = sum(r["distill_seconds"].values()) + r["scoring_seconds"]
        lines += [f"Scoring took {r['scoring_seconds'] / 60:.1f} min. Every distillation as first measured plus the "
                  f"scoring: {total / 60:.0f} min on this machine; rows distilled before `--pair-cache` existed count "
                  "the pairs they solved, which a run from empty caches would load for the rows that share them."]
    if r["missing"]:
        lines += ["", "Not trained in this run (`--only-trained`): " + ", ".join(r["missing"]) + "."]
    lines += ["", "Sample grid (`mini_sd_tables.png`): guidance 4, the same prompts and noise, one class a row, 4 "
              "samples a panel, panels left to right: " + ", ".join(r["grid_panels"]) + " (students: seed 0).", "",
              f"Regenerate: `{r.get('command', command_line([]))}` (after benchmarks/mini_sd_teacher.py).", ""]
    return "\n".join(lines)


def _mean(rows: list[dict], name: str, steps: int, guidance: float, key: str) -> float | None:
    xs = [x[key] for x in rows if x["row"] == name and x["steps"] == steps and x["guidance"] == guidance
          and x.get(key) is not None]  # only seed 0 is timed
    return statistics.mean(xs) if xs else None


def targets(r: dict) -> list[str]:
    """Issue 24's targets, each met or missed with its numbers (reported, not asserted)."""
    rows, out = r["rows"], ["## Targets (issue 24)", ""]
    for g in GUIDANCES:
        ref = _mean(rows, "teacher DDIM-32", 32, g, "fd")
        full = _mean(rows, "ProReflow-I (full)", 4, g, "fd")
        if ref is None or full is None:
            continue
        solvers = {n: _mean(rows, f"teacher {n}", 4, g, "fd") for n in ("DDIM-4", "DPM-Solver++-4", "UniPC-4")}
        beaten = [n for n, v in solvers.items() if v is not None and full < v]
        lost = [f"{n} ({v:.2f})" for n, v in solvers.items() if v is not None and full >= v]
        out.append(f"- Guidance {g:g}: ProReflow-I FD {full:.2f} = {full / ref:.2f}x the teacher's DDIM-32 ({ref:.2f}; "
                   f"target <= 1.3x: {'met' if full <= 1.3 * ref else 'missed'}); below "
                   f"{', '.join(beaten) or 'none of the 4-step solvers'}" + (f"; not below {', '.join(lost)}" if lost
                                                                              else "") + ".")
        two = _mean(rows, "ProReflow-II", 2, g, "fd")
        if two is not None:
            seeds = [x for x in rows if x["row"] == "ProReflow-II" and x["steps"] == 2 and x["guidance"] == g]
            out.append(f"  ProReflow-II at 2 steps: FD {_agg(seeds, 'fd', '.2f')} = {two / ref:.2f}x (target <= 2x: "
                       f"{'met' if two <= 2 * ref else 'missed'}; {len(seeds)} seed{'s' * (len(seeds) > 1)}).")
        acc_t = _mean(rows, "teacher DDIM-32", 32, g, "prompt_accuracy")
        accs = {st.name: _mean(rows, st.name, 4, g, "prompt_accuracy") for st in STUDENTS
                if 4 in st.steps and st.guidances == GUIDANCES}  # the guidance-distilled row is compared below
        # accuracies are counts over the images, kept as float32: exactly 2 points apart may read 0.0200000008
        far = [f"{n} ({a:.3f})" for n, a in accs.items() if a is not None and abs(a - acc_t) > 0.02 + 1e-6]
        out.append(f"  Prompt accuracy within 2 points of the teacher's {acc_t:.3f}: "
                   + ("every 4-step student." if not far else "all but " + ", ".join(far) + "."))
    gd = "guidance-distilled (pairs at guidance 4)"
    if _mean(rows, gd, 4, 1.0, "fd") is not None and _mean(rows, "ProReflow-I (full)", 4, 4.0, "fd") is not None:
        cell = lambda name, g: (f"FD {_mean(rows, name, 4, g, 'fd'):.2f}, prompt accuracy "
                                f"{_mean(rows, name, 4, g, 'prompt_accuracy'):.3f}, "
                                f"{_mean(rows, name, 4, g, 'seconds_per_image'):.4f} s / image")
        out.append(f"- Guidance-distilled student at CFG 1 (one UNet call a step): {cell(gd, 1.0)}; ProReflow-I at "
                   f"guidance 4 (two calls a step): {cell('ProReflow-I (full)', 4.0)}.")
    return out + [""]


def plot_sweep(r: dict, path: Path) -> None:
    """Fig. 3 in miniature: FD and prompt accuracy against guidance scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for name in ("teacher DDIM-32", "teacher DDIM-4", *SWEPT):
        xs = sorted((x for x in r["rows"] if x["row"] == name and x["seed"] in (None, 0) and x["steps"] in (4, 32)
                     and x["guidance"] in SWEEP), key=lambda x: x["guidance"])
        if not xs:
            continue
        for ax, key in zip(axes, ("fd", "prompt_accuracy")):
            ax.plot([x["guidance"] for x in xs], [x[key] for x in xs], marker="o", label=name)
    axes[0].set(xlabel="guidance scale", ylabel="FD (classifier features) ↓")
    axes[1].set(xlabel="guidance scale", ylabel="prompt accuracy ↑")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
