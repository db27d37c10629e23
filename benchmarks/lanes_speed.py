"""Do parallel lanes (`mini_sd_tables.py --jobs`, benchmarks/lanes.py) pay on this machine's cores? One short
ProReflow-I distillation (the tables' preset, a smaller budget) of the mini SD teacher, timed four ways, side by side
in one run: alone at 2 torch threads, alone at 1, two (seeds 0 and 1) side by side at 1 thread each, and two side by
side at 2 threads each (the cores oversubscribed). Each `proreflow distill` is a fresh process with no pair cache, so
every run solves its pairs, as a row that shares none does. Also: whether the student depends on the thread count
(its UNet compared tensor by tensor), which decides whether students trained in lanes are the tables' students.

    .venv/bin/python benchmarks/lanes_speed.py    # -> benchmarks/results/lanes_speed.{json,md} (~9 min)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from lanes import Job, run_lanes  # noqa: E402
from mini_sd_distill import distill  # noqa: E402
from mini_sd_regen import compare  # noqa: E402

from proreflow.store import atomic_write_text  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def side_by_side(seeds: list[int], threads: int, lanes: int, make) -> tuple[float, list[float]]:
    """Wall seconds for the students of `seeds` in `lanes` lanes, and each one's own seconds."""
    started = time.perf_counter()
    out = run_lanes([Job(s) for s in seeds], lanes, lambda job: make(job.key, threads)[1])
    return time.perf_counter() - started, [round(out[s], 1) for s in seeds]


def markdown(r: dict) -> str:
    w = r["wall_seconds"]
    lines = ["# Parallel lanes on this machine", "",
             f"One ProReflow-I distillation of the mini SD teacher ({r['budget_steps']} optimizer steps at batch 64, "
             f"pairs solved, fresh `proreflow distill` process), on {r['cores']} cores. Students per hour "
             "relative to one student at a time on 2 threads.", "",
             "| how | students | wall s | students per hour, relative |", "|---|---|---|---|"]
    base = 1 / w["alone, 2 threads"]
    for how, n in (("alone, 2 threads", 1), ("alone, 1 thread", 1), ("2 lanes, 1 thread each", 2),
                   ("2 lanes, 2 threads each (oversubscribed)", 2)):
        lines.append(f"| {how} | {n} | {w[how]:.1f} | {n / w[how] / base:.2f}x |")
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
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.budget_steps < 2:
        raise SystemExit("error: --budget-steps must be at least 2 (one per stage)")
    for need, what in ((args.teacher / "model_index.json", "benchmarks/mini_sd_teacher.py"),
                       (args.data, "benchmarks/mini_sd_tables.py (it writes the image folder)")):
        if not need.exists():
            raise SystemExit(f"error: {need} is missing; run {what} first")
    scratch = Path(tempfile.mkdtemp(prefix="lanes-speed-"))
    made: dict[str, Path] = {}

    def student(tag: str):
        def make(seed: int, threads: int) -> tuple[Path, float]:
            train = {"warmup_steps": max(1, args.budget_steps // 4), **({"seed": seed} if seed else {})}
            out = distill(f"{tag}, seed {seed}", f"{tag}-seed{seed}", {"budget_steps": args.budget_steps,
                          "train": train}, args.teacher, args.data, scratch / "students", threads)
            made[f"{tag}, seed {seed}"] = out[0]
            return out
        return make

    try:
        wall, each = {}, {}
        for how, seeds, threads, lanes in (("alone, 2 threads", [0], 2, 1), ("alone, 1 thread", [0], 1, 1),
                                           ("2 lanes, 1 thread each", [0, 1], 1, 2),
                                           ("2 lanes, 2 threads each (oversubscribed)", [0, 1], 2, 2)):
            tag = how.split(",")[0].replace(" ", "-") + f"-t{threads}"  # alone-t2, alone-t1, 2-lanes-t1, 2-lanes-t2
            wall[how], each[how] = side_by_side(seeds, threads, lanes, student(tag))
            print(how, round(wall[how], 1), each[how], flush=True)
        result = {"budget_steps": args.budget_steps, "cores": os.cpu_count(),
                  "wall_seconds": {k: round(v, 1) for k, v in wall.items()},
                  "student_seconds": each,
                  "thread_count_changes_the_student": compare(made["alone-t2, seed 0"], made["alone-t1, seed 0"]),
                  "lanes_match_alone": compare(made["alone-t1, seed 0"], made["2-lanes-t1, seed 0"])["bitwise"]
                  and compare(made["alone-t2, seed 0"], made["2-lanes-t2, seed 0"])["bitwise"],
                  "command": "python benchmarks/lanes_speed.py" + (f" --budget-steps {args.budget_steps}"
                                                                   if args.budget_steps != 40 else "")}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.results / "lanes_speed.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(args.results / "lanes_speed.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
