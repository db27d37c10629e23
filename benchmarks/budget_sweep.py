"""Budget sweep on digits: the paper's ablation (table 4) at 100 ... 2000 optimizer steps, over seeds.

Every method distils the digits flow teacher that `proreflow run configs/digits.yaml` trains (its cache is
reused from --digits-out), with the preset's recipe (time sampling, teacher solver, optimizer) at k steps.
Each stage draws its pairs from a fixed cache of `--pairs` teacher pairs, made once per stage schedule
and seed, so a larger budget sees more passes over the same pairs, not more teacher evaluations.

A single-stage method at budget B is the first B steps of one longer run: the learning rate is constant,
the EMA's warm-up counts steps from the start, and the batches from the cache do not depend on the total
(tested: `tests/test_time_sampling_and_pair_source.py`), so one run per seed scores every budget.
Progressive plans split each budget over their stages, so they train once per budget.

    python benchmarks/budget_sweep.py                       # 3 seeds, 100..1000 steps (after the digits run)
    python benchmarks/budget_sweep.py --budgets 100,200,500,1000,2000 --workers 2   # the longer sweep, seeds
                                                            # split over 2 one-thread processes
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

from proreflow.store import atomic_write_text, json_key
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
    cache = PairCacheConfig(bench.cache / "sweep-pairs" / json_key(counts, spec.pair_source, asdict(cfg.teacher_solver),
                                                              seed, bench.teacher_key(cfg.teacher.distill)),
                            pairs, cfg.pair_shard_size)
    rows: dict[int, dict] = {}

    def score(model: torch.nn.Module, final: Any, budget: int, seconds: float) -> None:
        imgs = bench.generate(model, final, final.steps_per_window(k), guidance=cfg.eval.guidance)
        rows[budget] = {"method": spec.name, "steps": k, "seed": seed, "budget": budget,
                        "time_sampling": sampling.label(), "train_seconds": round(seconds, 1),
                        **bench.score(imgs, reference)}

    def fit_plan(budget: int, on_step: Any = None) -> Any:
        recipe = replace(cfg.recipe(spec), budget_steps=budget, train=train)
        return train_plan(teacher, NetworkTeacher(teacher), bench.data_fn(), recipe, k, desc=f"{spec.name} B={budget}",
                          pair_cache=cache, on_step=on_step)

    started = time.perf_counter()
    if len(counts) == 1:  # one run, scored at every budget on the way
        final = spec.plan(k, max(budgets)).final
        clock = {"eval": 0.0}

        def on_step(stage: int, done: int, ema_model: Any, result: Any) -> None:
            if done in budgets:
                t0 = time.perf_counter()
                score(ema_model(), final, done, t0 - started - clock["eval"])
                clock["eval"] += time.perf_counter() - t0

        fit_plan(max(budgets), on_step)
    else:
        for budget in budgets:
            t0 = time.perf_counter()
            res = fit_plan(budget)
            score(res.student, spec.plan(k, budget).final, budget, time.perf_counter() - t0)
    return rows


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


def _in_workers(args: argparse.Namespace, argv: list[str], seeds: list[int], rows: list[dict],
                settings: dict) -> list[dict]:
    """Train the seeds in `args.workers` subprocesses (1 torch thread each, every worker its own seeds and its
    own results folder) and return all rows. Each (method, seed) run is independent: its pair caches are keyed
    by seed, and the teacher is read from the digits cache."""
    import os
    import subprocess

    shares = [seeds[w::args.workers] for w in range(args.workers) if seeds[w::args.workers]]
    base, it = [], iter(argv)  # the arguments without the ones each worker gets its own value of
    for a in it:
        if a in ("--workers", "--seeds", "--out"):
            next(it, None)
        else:
            base.append(a)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = []
    for w, share in enumerate(shares):
        out = args.out / f"worker-{w}"
        out.mkdir(parents=True, exist_ok=True)
        mine = [r for r in rows if r["seed"] in share]  # finished runs of these seeds carry over
        atomic_write_text(out / "budget_sweep.json", json.dumps({"settings": settings, "rows": mine, "minutes": 0.0}))
        cmd = [sys.executable, __file__, *base, "--seeds", ",".join(map(str, share)), "--out", str(out)]
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
    ap.add_argument("--budgets", default="100,200,500,1000")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=4, help="sampling steps of the students")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--pairs", type=int, default=6400, help="cached teacher pairs per stage (100 steps x 64)")
    ap.add_argument("--samples", type=int, default=500, help="samples per evaluation")
    ap.add_argument("--report-only", action="store_true",
                    help="write the table and plot from the runs already in <out>/budget_sweep.json, train nothing")
    ap.add_argument("--config", default="digits", help="digits preset or YAML (its methods and recipe)")
    ap.add_argument("--digits-out", type=Path, default=Path("results/digits"),
                    help="the `proreflow run` folder whose cache holds the digits teacher")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--workers", type=int, default=1,
                    help="split the seeds over this many processes of 1 torch thread each (2 on 2 cores)")
    args = ap.parse_args(argv)
    budgets = sorted(int(b) for b in args.budgets.split(","))
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    cfg = load_digits_config(args.config)
    cfg = replace(cfg, teacher=replace(cfg.teacher, kinds=[cfg.teacher.distill]),
                  eval=replace(cfg.eval, samples=args.samples))
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
    if args.workers > 1 and not args.report_only:
        rows = _in_workers(args, sys.argv[1:] if argv is None else argv, seeds, rows, settings)
        seeds = []  # trained by the workers
    for seed in [] if args.report_only else seeds:
        for name in methods:
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
