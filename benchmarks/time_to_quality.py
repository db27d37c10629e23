"""Time to quality: teacher evaluations and wall time until a student reaches a quality target,
for 2-rectified flow, PeRFlow and ProReflow, side by side in one run.

Every method trains at the preset's equal budget with pairs made on the fly (so the teacher's cost
is inside the wall time), and its EMA student is scored every `--eval-every` optimizer steps at k
sampling steps (evaluation time is excluded from the wall time). Two targets per setup:
- "all reach": the worst final score among the methods (every method reaches it);
- "PeRFlow final": PeRFlow's final score (the strongest baseline; "not reached" is reported).
Per seed, the first evaluation at or below the target that the next evaluation confirms counts (one noisy
dip does not); step 0 (the starting network) is scored too. The table quotes medians over seeds.

    python benchmarks/time_to_quality.py --setup toy      # exact GMM teacher, fidelity RMSE, 3 seeds
    python benchmarks/time_to_quality.py --setup digits   # digits flow teacher, FD, 1 seed; reuses the
                                                          # teacher cached by `proreflow run configs/digits.yaml`
Writes benchmarks/results/time_to_quality_<setup>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from proreflow.training import Recipe
from results_io import write_results

HERE = Path(__file__).parent
METHODS = ["2-rectified-flow", "perflow", "proreflow"]
#: train(plan, lam, on_step, seed) -> None ; score(model) -> float (lower is better)
Trainer = Callable[[Recipe, Callable[..., None]], Any]  # (recipe, on_step) -> trains


def curve(recipe: Recipe, k: int, every: int, train: Trainer, score: Callable[[torch.nn.Module], float],
          init: torch.nn.Module) -> list[dict]:
    """Scores of one training run at step 0 (`init`) and every `every` optimizer steps, with the teacher
    NFE and the training seconds (evaluation excluded) spent up to that point."""
    plan = recipe.plan(k)
    offsets = [sum(s.steps for s in plan.stages[:i]) for i in range(len(plan.stages))]
    stage_nfe: dict[int, int] = {}
    points: list[dict] = [{"step": 0, "teacher_nfe": 0, "seconds": 0.0, "score": score(init)}]
    clock = {"start": time.perf_counter(), "eval": 0.0}

    def on_step(stage: int, done: int, ema_model: Callable[[], torch.nn.Module], result: Any) -> None:
        stage_nfe[stage] = result.teacher_nfe
        step = offsets[stage] + done
        if step % every and step != plan.total_steps:
            return
        t0 = time.perf_counter()
        value = score(ema_model())
        points.append({"step": step, "teacher_nfe": sum(stage_nfe.values()),
                       "seconds": t0 - clock["start"] - clock["eval"], "score": value})
        clock["eval"] += time.perf_counter() - t0

    train(recipe, on_step)
    return points


def first_reach(points: list[dict], target: float) -> dict | None:
    """The first point at or below `target` whose successor (if any) is at or below it too."""
    for i, p in enumerate(points):
        if p["score"] <= target and (i + 1 == len(points) or points[i + 1]["score"] <= target):
            return p
    return None


def summarize(curves: dict[str, list[list[dict]]]) -> dict:
    finals = {m: statistics.median(c[-1]["score"] for c in runs) for m, runs in curves.items()}
    targets = {"all reach": max(finals.values())}
    if "perflow" in finals:
        targets["PeRFlow final"] = finals["perflow"]
    table = {}
    for tname, target in targets.items():
        rows = {}
        for m, runs in curves.items():
            hits = [first_reach(c, target) for c in runs]
            reached = [h for h in hits if h is not None]
            if len(reached) * 2 <= len(hits):  # the median run did not reach it
                rows[m] = {"reached": f"{len(reached)}/{len(hits)}"}
                continue
            rows[m] = {"reached": f"{len(reached)}/{len(hits)}",
                       **{key: statistics.median(h[key] if h else float("inf") for h in hits)
                          for key in ("step", "teacher_nfe", "seconds")}}
        table[tname] = {"target": target, "methods": rows}
    return {"final_median": finals, "targets": table}


def ratio(a: dict, b: dict, key: str) -> str:
    if key not in a or key not in b or not b[key]:
        return "–"
    return f"{a[key] / b[key]:.2f}"


def markdown(setup: str, metric: str, k: int, seeds: list[int], res: dict) -> str:
    lines = [f"# Time to quality: {setup}", "",
             f"{metric} of the EMA student at {k} steps; medians over seeds {seeds}; wall time excludes evaluation.",
             "", "| method | final " + metric + " |", "|---|---|"]
    lines += [f"| {m} | {v:.4f} |" for m, v in res["final_median"].items()]
    for tname, t in res["targets"].items():
        lines += ["", f"## Target \"{tname}\": {metric} ≤ {t['target']:.4f}", "",
                  "| method | runs reaching | optimizer steps | teacher NFE | seconds | NFE vs PeRFlow | NFE vs 2-RF | "
                  "time vs PeRFlow | time vs 2-RF |", "|---|---|---|---|---|---|---|---|---|"]
        rows = t["methods"]
        for m, r in rows.items():
            if "step" not in r:
                lines.append(f"| {m} | {r['reached']} | not reached | | | | | | |")
                continue
            pf, rf = rows.get("perflow", {}), rows.get("2-rectified-flow", {})
            lines.append(f"| {m} | {r['reached']} | {r['step']:.0f} | {r['teacher_nfe']:.3g} | {r['seconds']:.1f} | "
                         f"{ratio(r, pf, 'teacher_nfe')} | {ratio(r, rf, 'teacher_nfe')} | {ratio(r, pf, 'seconds')} | "
                         f"{ratio(r, rf, 'seconds')} |")
    return "\n".join(lines) + "\n"


def plot(curves: dict[str, list[list[dict]]], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for i, (m, runs) in enumerate(curves.items()):
        for j, c in enumerate(runs):
            kw = {"color": f"C{i}", "alpha": 0.8, "label": m if j == 0 else None}
            axes[0].plot([p["teacher_nfe"] for p in c], [p["score"] for p in c], **kw)
            axes[1].plot([p["seconds"] for p in c], [p["score"] for p in c], **kw)
    axes[0].set_xlabel("teacher evaluations (per-sample NFE, cumulative)"), axes[1].set_xlabel("training seconds")
    for ax in axes:
        ax.set_ylabel(metric), ax.set_yscale("log"), ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def toy(seeds: list[int], k: int, every: int) -> tuple[dict, str]:
    from proreflow.apps.toy import Comparison, find_method, points_data_fn, load_config, prepare, with_run_settings
    from proreflow.metrics import fidelity_rmse
    from proreflow.sampling import sample
    from proreflow.training import train_plan

    curves: dict[str, list[list[dict]]] = {m: [] for m in METHODS}
    for seed in seeds:
        cfg = with_run_settings(load_config(), seed, False)
        setup = prepare(cfg, None, None, seed)
        cmp = Comparison(cfg, setup, seed)
        for name in METHODS:
            spec = find_method(cfg, name)
            final = spec.plan(k, cfg.budget_steps).final

            def score(model: torch.nn.Module, final=final) -> float:
                with torch.no_grad():
                    x = sample(lambda x, t, c=None: model(x, t, c), cmp.noise, final, final.steps_per_window(k))
                return fidelity_rmse(x, cmp.reference)

            def train(recipe, on_step, setup=setup):
                train_plan(setup.base, setup.teacher, points_data_fn(setup.data.train), recipe, k, on_step=on_step)

            recipe = replace(cfg.recipe(spec), train=replace(cfg.train, seed=seed))
            curves[name].append(curve(recipe, k, every, train, score, setup.base))
            print(f"toy seed {seed} {name}: final fidelity {curves[name][-1][-1]['score']:.4f}", flush=True)
    return curves, "fidelity RMSE"


def digits(seeds: list[int], k: int, every: int, out: Path, samples: int) -> tuple[dict, str]:
    from proreflow.apps.digits import DigitsBench, load_digits_config
    from proreflow.fields.network import NetworkTeacher
    from proreflow.training import train_plan

    cfg = load_digits_config("digits")
    cfg = replace(cfg, teacher=replace(cfg.teacher, kinds=[cfg.teacher.distill]))
    bench = DigitsBench(cfg, out, progress=False)
    teacher = bench.teachers[cfg.teacher.distill]
    spec_by_name = {m.name: m for m in cfg.methods}
    curves: dict[str, list[list[dict]]] = {m: [] for m in METHODS}
    for seed in seeds:
        for name in METHODS:
            spec = spec_by_name[name]
            final = spec.plan(k, cfg.budget_steps).final

            def score(model: torch.nn.Module, final=final) -> float:
                imgs = bench.generate(model, final, final.steps_per_window(k), guidance=cfg.eval.guidance, n=samples)
                return bench.score(imgs)["fd"]

            def train(recipe, on_step):
                train_plan(teacher, NetworkTeacher(teacher), bench.data_fn(), recipe, k, on_step=on_step)

            recipe = replace(cfg.recipe(spec), train=replace(cfg.train, seed=seed, progress=False))
            curves[name].append(curve(recipe, k, every, train, score, teacher))
            print(f"digits seed {seed} {name}: final FD {curves[name][-1][-1]['score']:.3f}", flush=True)
    return curves, "FD"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup", choices=["toy", "digits"], required=True)
    ap.add_argument("--seeds", default=None, help="comma-separated (default: 0,1,2 for toy, 0 for digits)")
    ap.add_argument("--steps", type=int, default=4, help="sampling steps of the students")
    ap.add_argument("--eval-every", type=int, default=None, help="default: 100 (toy), 25 (digits)")
    ap.add_argument("--digits-out", type=Path, default=Path("results/digits"),
                    help="the `proreflow run` folder whose cache holds the digits teacher")
    ap.add_argument("--samples", type=int, default=500, help="digits: samples per FD evaluation")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in (args.seeds or ("0,1,2" if args.setup == "toy" else "0")).split(",")]
    every = args.eval_every or (100 if args.setup == "toy" else 25)
    if args.setup == "toy":
        curves, metric = toy(seeds, args.steps, every)
    else:
        curves, metric = digits(seeds, args.steps, every, args.digits_out, args.samples)
    res = summarize(curves)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"time_to_quality_{args.setup}"
    payload = {"setup": args.setup, "metric": metric, "steps": args.steps, "seeds": seeds, "eval_every": every,
               "device": "cpu", "torch_threads": torch.get_num_threads(), **res, "curves": curves}
    md = write_results(stem, payload, markdown(args.setup, metric, args.steps, seeds, res), indent=2)
    plot(curves, metric, stem.with_suffix(".png"))
    print(md)
    return payload


if __name__ == "__main__":
    main()
