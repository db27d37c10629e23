"""Do parallel lanes (`mini_sd_tables.py --jobs`, benchmarks/lanes.py) pay on this machine's cores? One short
ProReflow-I distillation (the tables' preset, a smaller budget) of the mini SD teacher, timed four ways, side by side
in one run: alone at 2 torch threads, alone at 1, two (seeds 0 and 1) side by side at 1 thread each, and two side by
side at 2 threads each (the cores oversubscribed). Each `proreflow distill` is a fresh process with no pair cache, so
every run solves its pairs, as a row that shares none does. Also: whether the student depends on the thread count
(its UNet compared tensor by tensor), which decides whether students trained in lanes are the tables' students.

    .venv/bin/python benchmarks/lanes_speed.py    # -> benchmarks/results/lanes_speed.{json,md} (~16 min)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from lanes import Job, run_lanes  # noqa: E402
from mini_sd_distill import distill  # noqa: E402
from mini_sd_regen import compare  # noqa: E402
from results_io import command_line, write_results  # noqa: E402


RESULTS = Path(__file__).parent / "results"
ALONE2, ALONE1, LANES1, OVER = ("alone, 2 threads", "alone, 1 thread", "2 lanes, 1 thread each",
                                "2 lanes, 2 threads each (oversubscribed)")
#: (how, seeds, torch threads per process, lanes)
WAYS = ((ALONE2, [0], 2, 1), (ALONE1, [0], 1, 1), (LANES1, [0, 1], 1, 2), (OVER, [0, 1], 2, 2))


def side_by_side(seeds: list[int], threads: int, lanes: int, make) -> tuple[float, list[float]]:
    """Wall seconds for the students of `seeds` in `lanes` lanes, and each one's own seconds."""
    started = time.perf_counter()
    out = run_lanes([Job(s) for s in seeds], lanes, lambda job: make(job.key, threads)[1])
    return time.perf_counter() - started, [round(out[s], 1) for s in seeds]


def markdown(r: dict) -> str:
    w = r["wall_seconds"]
    lines = ["# Parallel lanes on this machine", "",
             f"One ProReflow-I distillation of the mini SD teacher ({r['budget_steps']} optimizer steps at batch 64, "
             f"pairs solved, fresh `proreflow distill` process), on {r['cores']} cores; wall time the median of "
             f"{r['repeats']} runs of each way, interleaved (the oversubscribed way once). Students per hour "
             "relative to one student at a time on 2 threads.", "",
             "| how | students | wall s, median (each run) | students per hour, relative |", "|---|---|---|---|"]
    base = 1 / w[ALONE2]
    for how, seeds, _, _ in WAYS:
        runs = ", ".join(f"{x:.1f}" for x in r["wall_seconds_each"][how])
        lines.append(f"| {how} | {len(seeds)} | {w[how]:.1f} ({runs}) | {len(seeds) / w[how] / base:.2f}x |")
    c = r["thread_count_changes_the_student"]
    lines += ["", f"The 1-thread student against the 2-thread one: max abs difference {c['max_abs_diff']:.2g} over "
              f"{c['tensors']} UNet tensors (bitwise equal: {c['bitwise']}). The lane students against the same "
              f"seed alone at the same thread count: bitwise equal {r['lanes_match_alone']}.", "",
              f"Regenerate: `{r['command']}`.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, default=Path("runs/mini-sd-teacher"))
    ap.add_argument("--data", type=Path, default=Path("runs/mini-sd-data"))
    ap.add_argument("--budget-steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each way (the oversubscribed one runs once)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.budget_steps < 2 or args.repeats < 1:
        raise SystemExit("error: --budget-steps must be at least 2 (one per stage), --repeats at least 1")
    for need, what in ((args.teacher / "model_index.json", "benchmarks/mini_sd_teacher.py"),
                       (args.data, "benchmarks/mini_sd_tables.py (it writes the image folder)")):
        if not need.exists():
            raise SystemExit(f"error: {need} is missing; run {what} first")
    scratch = Path(tempfile.mkdtemp(prefix="lanes-speed-"))
    made: dict[str, Path] = {}
    kept: dict[str, dict[int, Path]] = {}

    def student(tag: str):
        def make(seed: int, threads: int) -> tuple[Path, float]:
            train = {"warmup_steps": max(1, args.budget_steps // 4), **({"seed": seed} if seed else {})}
            out = distill(f"{tag}, seed {seed}", f"{tag}-seed{seed}", {"budget_steps": args.budget_steps,
                          "train": train}, args.teacher, args.data, scratch / "students", threads)
            made[f"{tag}, seed {seed}"] = out[0]
            return out
        return make

    try:
        walls: dict[str, list[float]] = {}
        each: dict[str, list[float]] = {}
        for rep in range(args.repeats):  # the ways interleaved, so a slow spell of the machine hits them alike
            for how, seeds, threads, lanes in WAYS:
                if how == OVER and rep:  # several times slower: once says enough, and costs ~5 min
                    continue
                tag = how.split(",")[0].replace(" ", "-") + f"-t{threads}-r{rep}"  # alone-t2-r0, 2-lanes-t1-r0, ...
                shutil.rmtree(scratch / "students", ignore_errors=True)  # every repeat solves and trains anew
                wall, own = side_by_side(seeds, threads, lanes, student(tag))
                walls.setdefault(how, []).append(round(wall, 1))
                each.setdefault(how, []).extend(own)
                print(how, round(wall, 1), own, flush=True)
                if rep == 0:
                    for s in seeds:  # the first repeat's students, compared below
                        kept.setdefault(how, {})[s] = scratch / "kept" / tag / f"seed{s}"
                        shutil.copytree(made[f"{tag}, seed {s}"] / "unet", kept[how][s] / "unet")
        result = {"budget_steps": args.budget_steps, "cores": os.cpu_count(), "repeats": args.repeats,
                  "wall_seconds_each": walls, "wall_seconds": {k: statistics.median(v) for k, v in walls.items()},
                  "student_seconds": each,
                  "thread_count_changes_the_student": compare(kept[ALONE2][0], kept[ALONE1][0]),
                  "lanes_match_alone": compare(kept[ALONE1][0], kept[LANES1][0])["bitwise"]
                  and compare(kept[ALONE2][0], kept[OVER][0])["bitwise"],
                  "command": command_line("lanes_speed.py", sys.argv[1:])}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(write_results(args.results / "lanes_speed", result, markdown))


if __name__ == "__main__":
    main()
