"""Why does (or doesn't) ProReflow win on the exact-GMM toy? Controlled variants over seeds.

Each variant is a `MethodSpec` (its time sampling included) trained from the same shared
initial network at the same budget as `proreflow demo`; results are mean +- std over seeds.

    python benchmarks/toy_diagnostics.py            # full run, 3 seeds x 1, 2, 4 steps
    python benchmarks/toy_diagnostics.py --seeds 0 --budget 50 --base-steps 50 --samples 300  # smoke

Writes benchmarks/results/toy_diagnostics.{json,md} (or --out DIR).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

from proreflow.apps.toy import BaseConfig, Comparison, load_config, prepare, with_run_settings
from proreflow.methods import MethodSpec
from proreflow.time_sampling import TimeSampling
from results_io import write_results

HERE = Path(__file__).parent


def variants(preset: list[MethodSpec]) -> list[tuple[str, MethodSpec]]:
    """(group, method) pairs; methods without their own time sampling use the preset's. Variants that
    resolve to the same training as another (same plan key) are trained once."""
    uniform = TimeSampling("uniform", margin=0.1)
    out: list[tuple[str, MethodSpec]] = [("preset methods", m) for m in preset]
    out += [
        ("time sampling", MethodSpec("perflow, uniform, margin 0", windows=["k"],
                                     time_sampling=TimeSampling("uniform"))),
        ("time sampling", MethodSpec("perflow, uniform, margin 0.1", windows=["k"], time_sampling=uniform)),
        ("time sampling", MethodSpec("perflow, mixture 0.5, margin 0", windows=["k"],
                                     time_sampling=TimeSampling("mixture", 0.5))),
        ("time sampling", MethodSpec("perflow, mixture 0.5, margin 0.1", windows=["k"],
                                     time_sampling=TimeSampling("mixture", 0.5, 0.1))),
        ("time sampling", MethodSpec("perflow, start", windows=["k"], time_sampling=TimeSampling("start"))),
        ("time sampling", MethodSpec("proreflow, uniform, margin 0.1", windows="8->k", lam=1.0,
                                     time_sampling=uniform)),
        ("time sampling", MethodSpec("proreflow, start", windows="8->k", lam=1.0,
                                     time_sampling=TimeSampling("start"))),
    ]
    # a 2-window student (8 -> 4 -> 2) sampled at 2 steps and at 4 (two per window), per rule
    for label, rule in (("start", TimeSampling("start")), ("mixture 0.5", TimeSampling("mixture", 0.5, 0.1)),
                        ("uniform, margin 0.1", uniform)):
        out.append(("m x K sampling", MethodSpec(f"8->4->2, {label}", windows=[8, 4, 2], lam=1.0, time_sampling=rule)))
    out += [
        ("pair source", MethodSpec("progressive, pairs from the teacher", windows="8->k", lam=1.0)),
        ("pair source", MethodSpec("progressive, pairs from the previous stage", windows="8->k", lam=1.0,
                                   pair_source="previous_stage")),
        ("budget split", MethodSpec("progressive, equal split", windows="8->k")),
        ("budget split", MethodSpec("progressive, 60%+ to last stage", windows="8->k", stage_fractions=None)),
    ]
    return out


def final_heavy(spec: MethodSpec, k: int) -> MethodSpec:
    n = len(spec.window_counts(k))
    fractions = {1: [1.0], 2: [0.25, 0.75], 3: [0.15, 0.25, 0.6]}.get(n) or [0.4 / (n - 1)] * (n - 1) + [0.6]
    return replace(spec, stage_fractions=fractions)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", default="1,2,4")
    ap.add_argument("--budget", type=int, default=None, help="optimizer steps per method (preset: 1500)")
    ap.add_argument("--base-steps", type=int, default=None)
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--report-only", type=float, default=None, metavar="MINUTES",
                    help="write the markdown from <out>/toy_diagnostics.json (a run that took MINUTES), train nothing")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    ks = [int(s) for s in args.steps.split(",")]
    cfg = load_config(budget_steps=args.budget)
    if args.base_steps:
        cfg = replace(cfg, base=BaseConfig(steps=args.base_steps, lr=cfg.base.lr))
    if args.samples:
        cfg = replace(cfg, eval=replace(cfg.eval, samples=args.samples))
    if args.report_only is not None:
        rows = json.loads((args.out / "toy_diagnostics.json").read_text())
        (args.out / "toy_diagnostics.md").write_text(to_markdown(rows, seeds, ks, cfg, args.report_only * 60))
        return rows
    rows = []
    started = time.perf_counter()
    for seed in seeds:
        run_cfg = with_run_settings(cfg, seed, progress=False)
        setup = prepare(run_cfg, None, None, seed)
        cmp = Comparison(run_cfg, setup, seed)
        for group, spec in variants(cfg.methods):
            for k in ks:
                if spec.train and k % spec.window_counts(k)[-1]:
                    continue  # its final windows do not divide k (a 2-window student at 1 step)
                s = final_heavy(spec, k) if "last stage" in spec.name else spec
                row, _, _ = cmp.score(s, k)
                rows.append({"group": group, "variant": spec.name, **row})
                print(f"seed {seed} k={k} {spec.name:44s} fidelity {row['fidelity_rmse']:.4f}", flush=True)
    write_results(args.out / "toy_diagnostics", rows, to_markdown(rows, seeds, ks, cfg, time.perf_counter() - started),
                  indent=2)
    return rows


def to_markdown(rows: list[dict], seeds: list[int], ks: list[int], cfg, seconds: float) -> str:
    def stat(vals: list[float]) -> str:
        if not vals:  # e.g. a 2-window student at 1 step
            return "–"
        if len(vals) == 1:
            return f"{vals[0]:.4f}"
        return f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals):.4f}"

    lines = [
        f"Exact-GMM teacher, budget {cfg.budget_steps} optimizer steps x batch {cfg.train.batch_size} per variant, "
        f"preset time sampling {cfg.time_sampling.label()}, seeds {seeds}, mean ± std of teacher-fidelity RMSE (lower is better). "
        f"Generated by `python benchmarks/toy_diagnostics.py` in {seconds / 60:.1f} min.",
        "",
        "| group | variant | " + " | ".join(f"{k}-step fidelity" for k in ks) + " | "
        + " | ".join(f"{k}-step SW2" for k in ks) + " |",
        "|---|---|" + "---|" * (2 * len(ks)),
    ]
    seen = []
    for r in rows:
        if (r["group"], r["variant"]) not in seen:
            seen.append((r["group"], r["variant"]))
    for group, variant in seen:
        cells = []
        for metric in ("fidelity_rmse", "distance_swd"):
            for k in ks:
                vals = [r[metric] for r in rows if r["variant"] == variant and r["steps"] == k]
                cells.append(stat(vals))
        lines.append(f"| {group} | {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
