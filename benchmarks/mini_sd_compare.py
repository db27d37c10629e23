"""Two runs of `benchmarks/mini_sd_tables.py` side by side: each row of the first run (its seed 0 student, or the
teacher) against the second run's mean ± std over its seeds, in FD, prompt accuracy and fidelity, with the
difference in units of the second run's seed spread. Used to ask whether the tables' students, distilled in lanes
at 1 thread (`--jobs 2`), score like the earlier tables' 2-thread students (numerically other students).

    .venv/bin/python benchmarks/mini_sd_compare.py benchmarks/results/mini_sd_tables.json \
        benchmarks/results/mini_sd_tables_2thread/mini_sd_tables.json \
        --out benchmarks/results/mini_sd_tables_2thread/compare.md
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from proreflow.store import atomic_write_text

METRICS = (("fd", "FD", ".2f"), ("prompt_accuracy", "prompt accuracy", ".3f"), ("fidelity_rmse", "fidelity", ".4f"))


def _key(x: dict) -> tuple:
    return x["row"], x["steps"], x["guidance"]


def compare(a: dict, b: dict) -> list[dict]:
    """Per (row, steps, guidance) of `a` (seed 0 or the teacher): a's value, b's values over its seeds."""
    b_rows: dict[tuple, list[dict]] = {}
    for x in b["rows"]:
        b_rows.setdefault(_key(x), []).append(x)
    out = []
    for x in a["rows"]:
        if x["seed"] not in (None, 0) or _key(x) not in b_rows:
            continue
        ys = b_rows[_key(x)]
        b0 = next((y for y in ys if y["seed"] == x["seed"]), None)  # the same seed (or the teacher) in b
        out.append({"row": x["row"], "steps": x["steps"], "guidance": x["guidance"],
                    **{k: {"a": x[k], "b": [y[k] for y in ys], "b_same_seed": b0 and b0[k]} for k, _, _ in METRICS}})
    return out


def _cell(v: dict, fmt: str) -> str:
    bs = v["b"]
    if len(bs) == 1:
        return f"{v['a']:{fmt}} vs {bs[0]:{fmt}}"
    mean, std = statistics.mean(bs), statistics.stdev(bs)
    z = f" ({(v['a'] - mean) / std:+.1f} std)" if std > 0 else ""
    return f"{v['a']:{fmt}} vs {mean:{fmt}} ± {std:{fmt}}{z}"


def markdown(rows: list[dict], a_name: str, b_name: str) -> str:
    lines = [f"# {a_name} against {b_name}", "",
             f"Each cell: {a_name} (seed 0) vs {b_name} (mean ± std over its seeds where it has several; the "
             "difference in units of that std). Rows at guidance 1 and 4 only.", "",
             "| row | steps | guidance | " + " | ".join(label for _, label, _ in METRICS) + " |",
             "|---|---|---|" + "---|" * len(METRICS)]
    for r in rows:
        if r["guidance"] not in (1.0, 4.0):
            continue
        lines.append(f"| {r['row']} | {r['steps']} | {r['guidance']:g} | "
                     + " | ".join(_cell(r[k], fmt) for k, _, fmt in METRICS) + " |")
    lines += ["", "The same training seed in both runs against the spread over seeds, on the student rows with several "
              "seeds in the second run (median over rows at guidance 1 and 4):", "",
              "| metric | median abs difference, same seed | median std over seeds |", "|---|---|---|"]
    multi = [r for r in rows if r["guidance"] in (1.0, 4.0) and len(r["fd"]["b"]) > 1]
    for k, label, fmt in METRICS:
        same = [abs(r[k]["a"] - r[k]["b_same_seed"]) for r in multi if r[k]["b_same_seed"] is not None]
        spread = [statistics.stdev(r[k]["b"]) for r in multi]
        if same and spread:
            lines.append(f"| {label} | {statistics.median(same):{fmt}} | {statistics.median(spread):{fmt}} |")
    return "\n".join(lines + [""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path, help="a mini_sd_tables.json: its seed 0 rows are compared")
    ap.add_argument("b", type=Path, help="a mini_sd_tables.json: the reference, all its seeds")
    ap.add_argument("--out", type=Path, required=True, help="the md to write")
    args = ap.parse_args()
    for p in (args.a, args.b):
        if not p.is_file():
            raise SystemExit(f"error: {p} is not a file")
    rows = compare(json.loads(args.a.read_text()), json.loads(args.b.read_text()))
    md = markdown(rows, str(args.a.parent.name), str(args.b.parent.name) + "/" + args.b.name)
    atomic_write_text(args.out, md)  # whole, like every results file (results_io)
    print(md)


if __name__ == "__main__":
    main()
