"""The digits benchmark behind `proreflow run configs/digits.yaml`.

A class-conditional UNet2DModel teacher is trained on scikit-learn's digits, as an eps-prediction VP model
(like SD) and as a velocity (flow) model; students are distilled from one of them by every method of the
preset at equal budget, over several seeds; everything is scored by the Fréchet distance (FD) on a digits
classifier's features (torchmetrics' FID with a custom feature module), class accuracy of conditional
samples and teacher fidelity. The same run writes the ODE-solver baselines, the ablation table (paper
table 4), a CFG sweep (fig. 3) and the velocity analyses (figs. 1a, 1b).

Every expensive artefact (classifier, teachers, pair caches, students) is cached under `<out>/cache` keyed
by a hash of the settings it depends on, and trained with checkpoints, so a killed run resumes and a rerun
with a changed setting retrains only what that setting touches.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from proreflow.apps.digits.bench import DigitsBench, StudentRun, train_student
from proreflow.apps.digits.config import ABLATION_LABELS, DigitsConfig, samples_at
from proreflow.apps.digits.report import analysis_markdown, results_markdown
from proreflow.fields.network import NetworkTeacher
from proreflow.run_lock import run_lock
from proreflow.sampling import sample
from proreflow.run_settings import check_not_replacing
from proreflow.store import atomic_write_text
from proreflow.training import MonitorConfig, check_optimizer, check_stop
from proreflow.windows import WindowSchedule


def _solver_rows(bench: DigitsBench, kind: str) -> list[dict]:
    """The teacher at each student step count with each ODE solver, at equal NFE."""
    from proreflow.schedulers import make_scheduler
    from proreflow.schedulers.sample import scheduler_sample

    cfg, teacher = bench.cfg, bench.teachers[kind]
    ref = bench.reference(kind, cfg.eval.guidance)
    rows = [{"teacher": kind, "solver": f"euler ({cfg.eval.reference_steps} steps, reference)",
             "nfe": cfg.eval.reference_steps, **bench.score(ref, ref)}]
    for nfe in cfg.steps:
        for name in cfg.baselines:
            if name == "euler":
                out = bench.generate(teacher, WindowSchedule.uniform(1), nfe, guidance=cfg.eval.guidance)
                label = "euler (DDIM steps on a uniform-t grid)" if kind == "vp" else "euler"
            elif name == "heun":
                if nfe % 2:
                    continue
                out = bench.generate(teacher, WindowSchedule.uniform(1), nfe // 2, method="heun",
                                     guidance=cfg.eval.guidance)
                label = "heun"
            else:
                if name == "ddim" and kind == "flow":
                    continue  # a VP scheduler; on the flow teacher it would be our Euler
                sched = make_scheduler(name, bench.ddpm_config, flow=(kind == "flow"))
                net = teacher.unet if kind == "vp" else teacher.net
                out = bench.batched(lambda x, cond: scheduler_sample(net, sched, x, nfe, cond, cfg.eval.guidance))
                label = name
            rows.append({"teacher": kind, "solver": label, "nfe": nfe, **bench.score(out, ref)})
    return rows


def _student_row(bench: DigitsBench, run: StudentRun) -> dict:
    cfg = bench.cfg
    final = run.result.plan.final
    out = bench.generate(run.result.student, final, final.steps_per_window(run.k), guidance=cfg.eval.guidance)
    return {"method": run.method.name, "steps": run.k, "seed": run.seed, **cfg.recipe(run.method).describe(run.k),
            "teacher_nfe_per_pair": round(run.result.nfe_per_pair, 3),
            "student_nfe_per_pair": round(run.result.student_nfe_per_pair, 3),
            "optimizer_steps": run.result.optimizer_steps, "train_seconds": round(run.seconds, 1),
            **bench.score(out, bench.reference(cfg.teacher.distill, cfg.eval.guidance))}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_digits(cfg: DigitsConfig, out: Path, progress: bool = True, analyses: bool = True,
               monitor: MonitorConfig | None = None, overwrite: bool = False) -> dict:
    """Everything of the benchmark: results.json, results.md and the figures under `out`; with `monitor`, every
    student trained now logs its curves under `out/logs/<method>-k<steps>-s<seed>` (cached ones are not retrained).
    Results of another preset in `out` are refused unless `overwrite` (the same preset reruns from the cache)."""
    check_optimizer(cfg.train)  # before the folder is made
    check_not_replacing(Path(out) / "results.json", asdict(cfg), overwrite, "the digits benchmark's results",
                        lambda old: old.get("config"))
    with run_lock(out):  # one writer per folder (docs/reliability.md); makes `out`
        started = time.perf_counter()
        bench = DigitsBench(cfg, out, progress, monitor)
        log = bench.log
        results: dict[str, Any] = {"config": json.loads(json.dumps(asdict(cfg), default=str)),
                                   "classifier_heldout_accuracy": bench.classifier_accuracy}
        results["real"] = {"n_heldout": bench.data.test_x.shape[0], "n_train": bench.data.train_x.shape[0],
                           "fd_train_images": bench.fd(bench.data.train_x)}  # the floor real images reach
        log("ODE-solver baselines on the teachers")
        results["solvers"] = [r for kind in cfg.teacher.kinds for r in _solver_rows(bench, kind)]
        results["teacher_seconds"] = bench.teacher_seconds
        students: dict[tuple[str, int, int], StudentRun] = {}
        trained: dict[tuple, StudentRun] = {}
        rows = []
        every_k = set(cfg.steps_methods if cfg.steps_methods is not None else [m.name for m in cfg.methods])
        jobs = [(m, k, s) for s in cfg.seeds for k in cfg.steps for m in cfg.methods
                if m.train and samples_at(m, k) and (m.name in every_k or k == cfg.table_steps)]
        for i, (m, k, s) in enumerate(jobs):
            check_stop(f"before student {i + 1}/{len(jobs)}")
            key = (cfg.recipe(m).key(k), s)
            if key not in trained:
                log(f"student {i + 1}/{len(jobs)}: {m.name}, {k} steps, seed {s}")
                trained[key] = train_student(bench, m, k, s)
            run = trained[key]
            students[(m.name, k, s)] = StudentRun(m, k, s, run.result, run.seconds)
            rows.append(_student_row(bench, students[(m.name, k, s)]))
            log(f"  FD {rows[-1]['fd']:.3f}, class accuracy {rows[-1]['class_accuracy']:.3f}, "
                f"fidelity {rows[-1]['fidelity_rmse']:.4f}")
        results["students"] = rows
        results["table4"] = _table4(cfg, rows)
        check_stop("before the CFG sweep")
        log("CFG sweep")
        results["cfg_sweep"] = _cfg_sweep(bench, students)
        _plot_samples(bench, students, out / "samples.png")
        if analyses:
            check_stop("before the analyses")
            results["analysis"] = run_analyses(bench, out)
        results["summary"] = _summary(cfg, results)
        # what this invocation cost (a rerun on a warm cache skips cached teachers, pairs and students)
        results["run"] = {"wall_seconds": round(time.perf_counter() - started, 1),
                          "torch_threads": torch.get_num_threads(), "device": "cpu"}
        atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
        atomic_write_text(out / "results.md", results_markdown(results))
        log(f"done: {out / 'results.md'}")
        return results


def _table4(cfg: DigitsConfig, rows: list[dict]) -> list[dict]:
    table = []
    for name in cfg.table_methods:
        sel = [r for r in rows if r["method"] == name and r["steps"] == cfg.table_steps]
        fd_m, fd_s = _mean_std([r["fd"] for r in sel])
        acc_m, acc_s = _mean_std([r["class_accuracy"] for r in sel])
        fid_m, fid_s = _mean_std([r["fidelity_rmse"] for r in sel])
        table.append({"method": name, "label": ABLATION_LABELS.get(name, name), "steps": cfg.table_steps,
                      "seeds": [r["seed"] for r in sel], "fd_mean": fd_m, "fd_std": fd_s, "acc_mean": acc_m,
                      "acc_std": acc_s, "fidelity_mean": fid_m, "fidelity_std": fid_s})
    return table


def _cfg_sweep(bench: DigitsBench, students: dict[tuple[str, int, int], StudentRun]) -> list[dict]:
    cfg = bench.cfg
    rows = []
    for k in cfg.steps:
        run = students.get((cfg.sweep.method, k, cfg.seeds[0]))
        if run is None:
            continue
        final = run.result.plan.final
        for g in cfg.sweep.scales:
            out = bench.generate(run.result.student, final, final.steps_per_window(k), guidance=g, n=cfg.sweep.samples)
            rows.append({"method": run.method.name, "steps": k, "guidance": g, **bench.score(out)})
    from proreflow.plotting import plot_guidance_sweep

    if rows:
        groups: dict[str, list[dict]] = {}
        for r in rows:
            groups.setdefault(f"{r['method']}, {r['steps']} steps", []).append(r)
        plot_guidance_sweep(groups, [("fd", "FD (classifier features)"), ("class_accuracy", "class accuracy")],
                            bench.out / "fig3_cfg_sweep.png")
    return rows


def run_analyses(bench: DigitsBench, out: Path) -> dict:
    """Figs. 1a and 1b on the distillation teacher."""
    from proreflow.analysis import perturbed_field, velocity_discrepancy
    from proreflow.plotting import plot_discrepancy, plot_perturbation

    cfg, a = bench.cfg, bench.cfg.analysis
    kind = cfg.teacher.distill
    teacher = bench.teachers[kind]
    bench.log("fig 1a: velocity discrepancy along teacher trajectories")
    n = min(a.trajectories, bench.noise.shape[0])
    times, l2, cos = velocity_discrepancy(NetworkTeacher(teacher), bench.noise[:n], a.steps, bench.cond(n))
    plot_discrepancy(times, l2, cos, out / "fig1a_velocity_discrepancy.png")
    bench.log("fig 1b: direction vs magnitude perturbation")
    base = bench.noise[: a.samples]
    field0 = NetworkTeacher(teacher)
    cond = bench.cond(a.samples)
    clean = sample(field0, base, WindowSchedule.uniform(1), a.perturb_steps, cond=cond)
    fd_clean = bench.score(clean)["fd"]
    rows = []
    for kind_p in ("direction", "magnitude"):
        for eps in a.perturb_levels:
            if kind_p == "magnitude" and eps > 1:
                continue
            f = perturbed_field(field0, kind_p, eps, seed=cfg.eval.seed)
            imgs = sample(f, base, WindowSchedule.uniform(1), a.perturb_steps, cond=cond)
            rows.append({"perturbation": kind_p, "eps": eps, **bench.score(imgs, clean)})
    plot_perturbation(rows, fd_clean, out / "fig1b_perturbation.png")
    adjacent = [float(l2[i, i + 1]) for i in range(l2.shape[0] - 1)]
    return {"teacher": kind, "times": times.tolist(), "rms_l2": l2.tolist(), "cosine": cos.tolist(),
            "l2_first_last": float(l2[0, -1]), "cos_first_last": float(cos[0, -1]),
            "l2_adjacent_mean": statistics.fmean(adjacent), "perturb_fd_clean": fd_clean, "perturbation": rows}


def analyze_digits(cfg: DigitsConfig, out: Path, progress: bool = True) -> dict:
    """Only figs. 1a/1b (teacher analyses), reusing the cached teacher of a `run` in the same `out`."""
    with run_lock(out):  # one writer per folder
        bench = DigitsBench(replace(cfg, teacher=replace(cfg.teacher, kinds=[cfg.teacher.distill])), out, progress)
        res = run_analyses(bench, out)
        atomic_write_text(out / "analysis.json", json.dumps(res, indent=2) + "\n")
        atomic_write_text(out / "analysis.md", analysis_markdown(res))
        return res


def _plot_samples(bench: DigitsBench, students: dict[tuple[str, int, int], StudentRun], path: Path) -> None:
    from proreflow.plotting import plot_image_grid

    cfg = bench.cfg
    n = 20
    panels = {"held-out real": bench.data.test_x[:n]}
    for kind in cfg.teacher.kinds:
        panels[f"{kind} teacher, {cfg.eval.reference_steps} steps"] = bench.reference(kind, cfg.eval.guidance)[:n]
    for (name, k, s), run in students.items():
        if s == cfg.seeds[0]:
            final = run.result.plan.final
            panels[f"{name}, {k} steps"] = bench.generate(run.result.student, final, final.steps_per_window(k), n=n)
    plot_image_grid(panels, path)


def _summary(cfg: DigitsConfig, results: dict) -> dict:
    table = {r["method"]: r for r in results["table4"]}
    best = min(table.values(), key=lambda r: r["fd_mean"])
    out = {"table4_best": best["method"], "full_is_best": best["method"] == "proreflow"}
    if "proreflow" in table and "perflow" in table:
        out["full_vs_perflow_fd_ratio"] = table["proreflow"]["fd_mean"] / table["perflow"]["fd_mean"]
    return out
