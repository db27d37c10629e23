"""Training and sampling throughput, side by side in one run (medians over repeats, ratios).

1. Training steps/s of a student: flow matching (no teacher), reflow with pairs made on the fly
   (PeRFlow's 4 windows and global 2-rectified flow) and reflow from a pair cache, for the toy MLP and
   the digits UNet (median step time from `fit`'s per-step callback, first steps excluded).
2. Teacher passes with autograd off: `torch.no_grad` vs `torch.inference_mode` (what pair generation uses).
3. Samples/s of the digits student vs its teacher at equal quality: the teacher's Euler step count is
   the smallest n = 1, 2, 3, ... (up to 64) whose FD is at or below the student's; both are timed on the
   same batch.

    python benchmarks/throughput.py     # needs the digits cache of `proreflow run configs/digits.yaml`
Writes benchmarks/results/throughput.{json,md}. A GPU run is not recorded yet (no GPU in our sessions).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from results_io import write_results

HERE = Path(__file__).parent


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_rate(run: Callable[[Callable[..., None]], Any], skip: int = 3) -> float:
    """Median optimizer steps per second of a `fit`/`train_plan` run, from per-step timestamps."""
    stamps: list[float] = []
    run(lambda *_: stamps.append(time.perf_counter()))
    gaps = [b - a for a, b in zip(stamps[skip:-1], stamps[skip + 1:])]
    return 1.0 / statistics.median(gaps)


def training_rows(steps: int, digits_out: Path) -> tuple[list[dict], Any]:
    from proreflow.data.toy import builtin_points
    from proreflow.apps.digits import DigitsBench, load_digits_config
    from proreflow.models.mlp import VelocityMLP
    from proreflow.pairs import TeacherSolver
    from proreflow.fields.network import NetworkTeacher
    from proreflow.training import PairCacheConfig, Recipe, TrainConfig, fit, flow_matching_batches, train_plan
    from proreflow.methods import MethodSpec

    rows = []
    # toy: MLP 256x4 student, batch 256, an MLP teacher of the same size, RK4 teacher (the demo's solver)
    pts = torch.as_tensor(builtin_points("moons", 20000, 0), dtype=torch.float32)

    def toy_data(n: int, gen: torch.Generator):
        return pts[torch.randint(0, pts.shape[0], (n,), generator=gen)], None

    torch.manual_seed(0)
    toy_teacher = NetworkTeacher(VelocityMLP(2, 256, 4))
    toy_init = VelocityMLP(2, 256, 4)
    cfg = TrainConfig(lr=1e-3, batch_size=256, progress=False)
    solver = TeacherSolver("rk4", 16, "per_unit_time")
    digits_cfg = load_digits_config("digits")
    digits_cfg = replace(digits_cfg, teacher=replace(digits_cfg.teacher, kinds=[digits_cfg.teacher.distill]))
    bench = DigitsBench(digits_cfg, digits_out, progress=False)
    dteacher = bench.teachers[digits_cfg.teacher.distill]
    dcfg = replace(digits_cfg.train, progress=False)
    setups = [("toy MLP 256x4, batch 256", toy_init, toy_teacher, toy_data, cfg, solver),
              ("digits UNet (32, 64), batch 64", dteacher, NetworkTeacher(dteacher), bench.data_fn(), dcfg,
               digits_cfg.teacher_solver)]
    with tempfile.TemporaryDirectory() as tmp:
        for name, init, teacher, data_fn, tcfg, tsolver in setups:
            def plan_run(windows: int, cache: bool, init=init, teacher=teacher, data_fn=data_fn, tcfg=tcfg,
                         tsolver=tsolver, name=name, precision: str | None = None):
                train = tcfg if precision is None else replace(tcfg, mixed_precision=precision)
                recipe = Recipe(MethodSpec("reflow", windows=[windows], lam=0.0), steps, teacher_solver=tsolver,
                                train=train)
                pc = PairCacheConfig(Path(tmp) / f"{name[:4]}-{windows}", None, 4096) if cache else None
                if cache:  # build the cache first: its cost is paid once, up front
                    train_plan(init, teacher, data_fn, recipe, windows, pair_cache=pc)
                return lambda cb: train_plan(init, teacher, data_fn, recipe, windows, pair_cache=pc,
                                             on_step=lambda s, d, m, r: cb())

            variants = {
                "flow matching (no teacher)": lambda cb, init=init, data_fn=data_fn, tcfg=tcfg: fit(
                    init, flow_matching_batches(data_fn, tcfg.batch_size), steps, tcfg, on_step=lambda *_: cb()),
                "reflow K=4, pairs on the fly": plan_run(4, False),
                "reflow K=1 (global), pairs on the fly": plan_run(1, False),
                "reflow K=4, cached pairs": plan_run(4, True),
            }
            if tcfg.mixed_precision != "no":  # the digits preset's bf16 autocast against fp32, same pairs
                variants["reflow K=4, cached pairs, fp32"] = plan_run(4, True, precision="no")
            rates = {k: step_rate(v) for k, v in variants.items()}
            base = rates["reflow K=4, cached pairs"]
            for k, r in rates.items():
                rows.append({"setup": name, "variant": k, "steps_per_s": r, "pairs_per_s": r * tcfg.batch_size,
                             "vs_cached": r / base})
            print(f"{name}: " + ", ".join(f"{k} {v:.1f}/s" for k, v in rates.items()), flush=True)
    return rows, bench


def grad_mode_row(bench: Any, repeats: int) -> dict:
    teacher = bench.teachers[bench.cfg.teacher.distill]
    x = torch.randn(256, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.rand(256, generator=torch.Generator().manual_seed(1))
    cond = bench.cond(256) if bench.labels.shape[0] >= 256 else None

    def run(ctx):
        def go():
            with ctx():
                teacher(x, t, cond)
        return go

    a = median_time(run(torch.no_grad), repeats, 2)
    b = median_time(run(torch.inference_mode), repeats, 2)
    return {"no_grad_ms": a * 1e3, "inference_mode_ms": b * 1e3, "speedup": a / b}


def sampling_rows(bench: Any, repeats: int) -> list[dict]:
    from proreflow.apps.digits import train_student
    from proreflow.windows import WindowSchedule

    cfg = bench.cfg
    teacher = bench.teachers[cfg.teacher.distill]
    spec = next(m for m in cfg.methods if m.name == "proreflow")
    ladder: dict[int, float] = {}

    def teacher_steps_at(fd: float) -> int | None:
        for n in range(1, 65):  # every step count, not a power-of-two ladder
            if n not in ladder:
                ladder[n] = bench.score(bench.generate(teacher, WindowSchedule.uniform(1), n))["fd"]
            if ladder[n] <= fd:
                return n
        return None

    rows = []
    n_batch = bench.noise.shape[0]
    for k in cfg.steps:
        run = train_student(bench, spec, k, cfg.seeds[0])  # the cached student of `proreflow run`
        final = spec.plan(k, cfg.budget_steps).final
        per = final.steps_per_window(k)
        fd = bench.score(bench.generate(run.result.student, final, per))["fd"]
        match = teacher_steps_at(fd)
        t_student = median_time(lambda: bench.generate(run.result.student, final, per), repeats)
        row = {"student": f"proreflow, {k} steps", "student_fd": fd, "teacher_fd_by_steps": dict(ladder),
               "teacher_steps_at_equal_fd": match, "student_samples_per_s": n_batch / t_student}
        if match is not None:
            t_teacher = median_time(lambda: bench.generate(teacher, WindowSchedule.uniform(1), match), repeats)
            row.update(teacher_samples_per_s=n_batch / t_teacher, speedup=t_teacher / t_student)
        rows.append(row)
        print(row, flush=True)
    return rows


def markdown(res: dict) -> str:
    lines = ["# Throughput", "", f"Device: {res['device']}. Medians over repeats; ratios measured in the same run. "
             "Digits students train under the preset's bf16 autocast except the fp32 row.", "",
             "## Training steps/s", "", "| setup | variant | steps/s | pairs/s | vs cached pairs |", "|---|---|---|---|---|"]
    lines += [f"| {r['setup']} | {r['variant']} | {r['steps_per_s']:.2f} | {r['pairs_per_s']:.0f} | {r['vs_cached']:.2f} |"
              for r in res["training"]]
    g = res["grad_mode"]
    lines += ["", "## Teacher pass, digits UNet, batch 256", "",
              f"`torch.no_grad` {g['no_grad_ms']:.1f} ms, `torch.inference_mode` {g['inference_mode_ms']:.1f} ms "
              f"(speed-up {g['speedup']:.2f}x).", "",
              "## Sampling at equal quality (digits, FD)", "",
              "| student | student FD | teacher Euler steps at ≤ that FD | student samples/s | teacher samples/s | speed-up |",
              "|---|---|---|---|---|---|"]
    for r in res["sampling"]:
        lines.append(f"| {r['student']} | {r['student_fd']:.2f} | {r['teacher_steps_at_equal_fd'] or 'none ≤ 64'} | "
                     f"{r['student_samples_per_s']:.0f} | {r.get('teacher_samples_per_s', float('nan')):.0f} | "
                     f"{r.get('speedup', float('nan')):.1f}x |")
    ladder = res["sampling"][-1]["teacher_fd_by_steps"] if res["sampling"] else {}
    lines += ["", "Teacher FD by Euler steps: " + ", ".join(f"{k}: {v:.2f}" for k, v in ladder.items()), "",
              "GPU (SD-sized UNet training step, 4-step sampling): not yet measured (no GPU in our sessions)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per training-rate measurement")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--digits-out", type=Path, default=Path("results/digits"))
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    training, bench = training_rows(args.steps, args.digits_out)
    res = {"device": f"cpu, {torch.get_num_threads()} threads", "training": training,
           "grad_mode": grad_mode_row(bench, 20), "sampling": sampling_rows(bench, args.repeats)}
    print(write_results(args.out / "throughput", res, markdown, indent=2))
    return res


if __name__ == "__main__":
    main()
