"""Budget sweep on digits: the paper's ablation (table 4) at 100 ... 2000 optimizer steps, over seeds.

Every method distils the digits flow teacher that `proreflow run configs/digits.yaml` trains (its cache is
reused from --digits-out), with the preset's recipe (time sampling, teacher solver, optimizer) at k steps.
Each stage draws its pairs from a fixed cache of `--pairs` teacher pairs, made once per stage schedule
and seed, so a larger budget sees more passes over the same pairs, not more teacher evaluations. The caches
live in the digits run's pair directory: at the preset's `pairs`, the run has already solved every one.

Stage 1 at budget B is the first steps of stage 1 at a larger budget: the learning rate is constant, the
EMA's warm-up counts steps from the start, and the batches do not depend on the total (both tested in
`tests/test_time_sampling_and_pair_source.py`). So one run per (method, seed) to the largest budget's stage 1
scores every budget of a single-stage method on the way, and a progressive method trains only its later
stages once per budget, from that run's EMA snapshots (bitwise the same students as training each budget's
plan from scratch).

    python benchmarks/budget_sweep.py --workers 2          # 3 seeds, 100..2000 steps (after the digits run),
                                                           # (method, seed) runs over 2 one-thread processes
    python benchmarks/budget_sweep.py --budgets 20,40 --seeds 0 --samples 100 --out /tmp/sweep  # smoke

Results are written after every run (and reused on a rerun) to <out>/budget_sweep.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from proreflow.store import atomic_write_text
from proreflow.methods import MethodSpec

HERE = Path(__file__).parent
METHODS = ["2-rectified-flow", "perflow", "proreflow-no-aligned", "proreflow-no-progressive", "proreflow"]


def run_method(bench: Any, spec: MethodSpec, k: int, budgets: list[int], seed: int, pairs: int) -> dict[int, dict]:
    """Scores of `spec`'s k-step student at every budget for one seed: {budget: row}."""
    from proreflow.fields.network import NetworkTeacher
    from proreflow.training import PairCacheConfig, train_plan

    cfg = bench.cfg
    teacher = bench.teachers[cfg.teacher.distill]
    reference = bench.reference(cfg.teacher.distill, cfg.eval.guidance)
    sampling = spec.sampling(cfg.time_sampling)
    train = replace(cfg.train, seed=seed, progress=False)
    counts = spec.window_counts(k)
    rows: dict[int, dict] = {}

    # the digits run's pair directory: a stage's cache there is named by its windows, pair seed, count, solver
    # and solving weights, so the run's caches are reused when `pairs` is the preset's count
    cache = PairCacheConfig(bench.pairs_dir(cfg.teacher.distill), pairs, cfg.pair_shard_size)

    def score(model: torch.nn.Module, final: Any, budget: int, seconds: float) -> None:
        imgs = bench.generate(model, final, final.steps_per_window(k), guidance=cfg.eval.guidance)
        rows[budget] = {"method": spec.name, "steps": k, "seed": seed, "budget": budget,
                        "time_sampling": sampling.label(), "train_seconds": round(seconds, 1),
                        **bench.score(imgs, reference)}

    def fit_plan(budget: int, on_step: Any = None, init: Any = teacher, stages: tuple = (0, None)) -> Any:
        recipe = replace(cfg.recipe(spec), budget_steps=budget, train=train)
        return train_plan(init, NetworkTeacher(teacher), bench.data_fn(), recipe, k, desc=f"{spec.name} B={budget}",
                          pair_cache=cache, on_step=on_step, stages=stages)

    # Stage 1 at budget B is the first steps of stage 1 at a larger budget (constant learning rate, EMA warm-up
    # counted from the start, batches independent of the total; tested in tests/test_time_sampling_and_pair_source.py),
    # so one run to the largest budget's stage 1 gives every budget's stage-1 student: a single-stage method is
    # scored on the way, a progressive one trains its later stages from each snapshot.
    first = stage1_steps(spec, k, budgets)
    snapshots: dict[int, tuple[Any, float]] = {}
    started, clock = time.perf_counter(), {"eval": 0.0}

    def on_step(stage: int, done: int, ema_model: Any, result: Any) -> None:
        if done not in first.values():
            return
        t0 = time.perf_counter()
        seconds = t0 - started - clock["eval"]
        if len(counts) == 1:
            score(ema_model(), spec.plan(k, done).final, done, seconds)
        else:
            snapshots[done] = (ema_model(), seconds)
        clock["eval"] += time.perf_counter() - t0

    fit_plan(max(budgets), on_step, stages=(0, 1))
    for budget in budgets if len(counts) > 1 else []:
        model, stage1_seconds = snapshots[first[budget]]
        t0 = time.perf_counter()
        res = fit_plan(budget, init=model, stages=(1, None))
        score(res.student, spec.plan(k, budget).final, budget, stage1_seconds + time.perf_counter() - t0)
    return rows


def stage1_steps(spec: MethodSpec, k: int, budgets: list[int]) -> dict[int, int]:
    """{budget: optimizer steps of its plan's first stage}."""
    return {b: spec.plan(k, b).stages[0].steps for b in budgets}


def job_cost(spec: MethodSpec, k: int, budgets: list[int]) -> int:
    """Optimizer steps `run_method` takes: stage 1 once to the largest budget, later stages per budget."""
    firsts = stage1_steps(spec, k, budgets)
    return max(firsts.values()) + sum(b - f for b, f in firsts.items())


def markdown(rows: list[dict], methods: list[str], budgets: list[int], seeds: list[int], k: int, meta: dict) -> str:
    def stat(vals: list[float], nd: int) -> str:
        if not vals:
            return "–"
        if len(vals) == 1:
            return f"{vals[0]:.{nd}f}"
        return f"{statistics.fmean(vals):.{nd}f} ± {statistics.stdev(vals):.{nd}f}"

    lines = [f"# Budget sweep: digits, {k}-step students", "",
             f"Mean ± std over seeds {seeds} of teacher-fidelity RMSE (to the teacher's {meta['reference_steps']}-step "
             f"Euler output from the same noise) and FD, {meta['samples']} samples, batch {meta['batch_size']}, "
             f"{meta['pairs']} cached teacher pairs per stage. Preset time sampling: {meta['time_sampling']}. "
             f"Generated by `python benchmarks/budget_sweep.py` ({meta['minutes']:.0f} min of runs, "
             f"{meta.get('workers', 1)} process(es) of {meta['threads']} CPU thread(s)).", ""]
    for metric, nd, title in (("fidelity_rmse", 4, "Teacher-fidelity RMSE"), ("fd", 2, "FD")):
        lines += [f"## {title}", "", "| method | " + " | ".join(f"{b} steps" for b in budgets) + " |",
                  "|---|" + "---|" * len(budgets)]
        for m in methods:
            cells = [stat([r[metric] for r in rows if r["method"] == m and r["budget"] == b], nd) for b in budgets]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], methods: list[str], budgets: list[int], teacher_rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (metric, label) in zip(axes, (("fidelity_rmse", "teacher-fidelity RMSE"), ("fd", "FD"))):
        for i, m in enumerate(methods):
            means, stds, xs = [], [], []
            for b in budgets:
                vals = [r[metric] for r in rows if r["method"] == m and r["budget"] == b]
                if vals:
                    xs.append(b)
                    means.append(statistics.fmean(vals))
                    stds.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
            ax.errorbar(xs, means, yerr=stds, color=f"C{i}", marker="o", ms=3, capsize=3, label=m)
        for j, (name, value) in enumerate(teacher_rows.get(metric, {}).items()):
            ax.axhline(value, color="0.4", ls=("--", ":")[j % 2], lw=1, label=name)
        ax.set_xscale("log"), ax.set_xlabel("optimizer steps (batch fixed)"), ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def split_jobs(jobs: list[tuple[str, int]], costs: dict[str, int], workers: int) -> list[list[tuple[str, int]]]:
    """(method, seed) runs spread over `workers` so that their optimizer steps are as even as possible
    (longest first, each to the least loaded worker)."""
    shares: list[list[tuple[str, int]]] = [[] for _ in range(workers)]
    load = [0] * workers
    for job in sorted(jobs, key=lambda j: -costs[j[0]]):
        w = load.index(min(load))
        shares[w].append(job)
        load[w] += costs[job[0]]
    return [sorted(s, key=jobs.index) for s in shares if s]


def _in_workers(args: argparse.Namespace, argv: list[str], shares: list[list[tuple[str, int]]], rows: list[dict],
                settings: dict) -> list[dict]:
    """Run each share of (method, seed) jobs in its own subprocess (1 torch thread, its own results folder) and
    return all rows. Each job is independent: its pair caches are keyed by seed, and the teacher is read from
    the digits cache."""
    import os
    import subprocess

    base, it = [], iter(argv)  # the arguments without the ones each worker gets its own value of
    for a in it:
        if a in ("--workers", "--seeds", "--out", "--jobs"):
            next(it, None)
        else:
            base.append(a)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = []
    for w, share in enumerate(shares):
        out = args.out / f"worker-{w}"
        out.mkdir(parents=True, exist_ok=True)
        mine = [r for r in rows if (r["method"], r["seed"]) in share]  # finished runs carry over
        atomic_write_text(out / "budget_sweep.json", json.dumps({"settings": settings, "rows": mine, "minutes": 0.0}))
        cmd = [sys.executable, __file__, *base, "--jobs", ",".join(f"{m}@{s}" for m, s in share), "--out", str(out)]
        procs.append(subprocess.Popen(cmd, env=env))
    if any(p.wait() for p in procs):
        raise SystemExit("error: a sweep worker failed; rerun the same command to continue from its results")
    merged = []
    for w in range(len(shares)):
        merged += json.loads((args.out / f"worker-{w}" / "budget_sweep.json").read_text())["rows"]
    return merged


def main(argv: list[str] | None = None) -> dict:
    from proreflow.apps.digits import DigitsBench, load_digits_config
    from proreflow.windows import WindowSchedule

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="100,200,500,1000,2000")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=4, help="sampling steps of the students")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--pairs", type=int, default=None,
                    help="cached teacher pairs per stage (default: the digits preset's `pairs`, else 6400)")
    ap.add_argument("--samples", type=int, default=500, help="samples per evaluation")
    ap.add_argument("--report-only", action="store_true",
                    help="write the table and plot from the runs already in <out>/budget_sweep.json, train nothing")
    ap.add_argument("--config", default="digits", help="digits preset or YAML (its methods and recipe)")
    ap.add_argument("--digits-out", type=Path, default=Path("results/digits"),
                    help="the `proreflow run` folder whose cache holds the digits teacher")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--workers", type=int, default=1,
                    help="split the (method, seed) runs over this many processes of 1 torch thread each (2 on 2 cores)")
    ap.add_argument("--jobs", default=None, help=argparse.SUPPRESS)  # a worker's share: method@seed,...
    args = ap.parse_args(argv)
    budgets = sorted(int(b) for b in args.budgets.split(","))
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    cfg = load_digits_config(args.config)
    cfg = replace(cfg, teacher=replace(cfg.teacher, kinds=[cfg.teacher.distill]),
                  eval=replace(cfg.eval, samples=args.samples))
    if args.pairs is None:
        args.pairs = cfg.pairs or 6400
    by_name = {m.name: m for m in cfg.methods}
    unknown = [m for m in methods if m not in by_name]
    if unknown:
        raise SystemExit(f"error: methods {unknown} are not in the preset {sorted(by_name)}")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / "budget_sweep"
    bench = DigitsBench(cfg, args.digits_out, progress=False)
    settings = {"budgets": budgets, "steps": args.steps, "pairs": args.pairs, "samples": args.samples,
                "config": json.loads(json.dumps(asdict(cfg), default=str))}
    previous = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").is_file() else {}
    same = previous.get("settings") == settings
    rows: list[dict] = previous.get("rows", []) if same else []
    carried = previous.get("minutes", 0.0) if same else 0.0  # minutes spent by earlier invocations
    started = time.perf_counter()
    jobs = [(m, s) for s in seeds for m in methods]
    if args.jobs:
        jobs = [(j.rsplit("@", 1)[0], int(j.rsplit("@", 1)[1])) for j in args.jobs.split(",")]
    if args.workers > 1 and not args.report_only:
        costs = {m: job_cost(by_name[m], args.steps, budgets) for m in methods}
        rows = _in_workers(args, sys.argv[1:] if argv is None else argv, split_jobs(jobs, costs, args.workers),
                           rows, settings)
        order = {m: i for i, m in enumerate(methods)}
        rows.sort(key=lambda r: (r["seed"], order.get(r["method"], len(order)), r["budget"]))
        jobs = []  # trained by the workers
    for name, seed in [] if args.report_only else jobs:
        if sum(1 for r in rows if r["method"] == name and r["seed"] == seed) == len(budgets):
            continue  # finished in an earlier invocation
        rows = [r for r in rows if not (r["method"] == name and r["seed"] == seed)]
        got = run_method(bench, by_name[name], args.steps, budgets, seed, args.pairs)
        rows += [got[b] for b in budgets]
        print(f"seed {seed} {name}: " + ", ".join(f"B={b} fid {got[b]['fidelity_rmse']:.4f}" for b in budgets),
              flush=True)
        minutes = carried + (time.perf_counter() - started) / 60
        atomic_write_text(stem.with_suffix(".json"),
                          json.dumps({"settings": settings, "rows": rows, "minutes": minutes}, indent=2) + "\n")
    ref = bench.reference(cfg.teacher.distill, cfg.eval.guidance)
    euler = bench.score(bench.generate(bench.teachers[cfg.teacher.distill], WindowSchedule.uniform(1), args.steps), ref)
    teacher_rows = {"fidelity_rmse": {f"teacher, {args.steps} Euler steps": euler["fidelity_rmse"]},
                    "fd": {f"teacher, {args.steps} Euler steps": euler["fd"]}}
    meta = {"reference_steps": cfg.eval.reference_steps, "samples": args.samples, "batch_size": cfg.train.batch_size,
            "pairs": args.pairs, "time_sampling": cfg.time_sampling.label(),
            "minutes": carried + (0.0 if args.report_only else (time.perf_counter() - started) / 60),
            "threads": 1 if args.workers > 1 else torch.get_num_threads(), "workers": args.workers}
    payload = {"settings": settings, "rows": rows, "minutes": meta["minutes"], "teacher_euler": euler, "meta": meta}
    atomic_write_text(stem.with_suffix(".json"), json.dumps(payload, indent=2) + "\n")
    done = sorted({r["seed"] for r in rows})
    md = markdown(rows, methods, budgets, done, args.steps, meta)
    md += (f"\nTeacher, {args.steps} Euler steps: fidelity {euler['fidelity_rmse']:.4f}, FD {euler['fd']:.2f}.\n")
    atomic_write_text(stem.with_suffix(".md"), md)
    plot(rows, methods, budgets, teacher_rows, stem.with_suffix(".png"))
    print(md)
    return payload


if __name__ == "__main__":
    main()
