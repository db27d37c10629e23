"""Do the mini SD tables regenerate from empty caches? Distil rows of `benchmarks/mini_sd_tables.py` again, exactly
as it does (`proreflow distill` in a fresh process), into a scratch folder with an empty `--pair-cache`, and compare
each new student's UNet with the one the tables were scored on, tensor by tensor (issue 24).

The rows run in order and share the scratch cache, as in the tables' run: ProReflow-I solves its pairs, w/o aligned
(lambda 0, the same draws) loads them. Bitwise-equal UNets score the same numbers, so the tables' rows hold for a
run from empty caches; the wall times say what such a run costs a row that solves and a row that loads.

    .venv/bin/python benchmarks/mini_sd_regen.py   # -> benchmarks/results/mini_sd_regen.{json,md} (~9 min)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from mini_sd_distill import distill, student_record  # noqa: E402
from mini_sd_tables import STUDENTS  # noqa: E402
from results_io import command_line, write_results  # noqa: E402


RESULTS = Path(__file__).parent / "results"


def compare(kept: Path, new: Path) -> dict:
    """Largest absolute difference over the UNet's tensors, and whether every tensor is bitwise equal."""
    from safetensors.torch import load_file

    a = load_file(str(next((kept / "unet").glob("*.safetensors"))))
    b = load_file(str(next((new / "unet").glob("*.safetensors"))))
    if set(a) != set(b):
        return {"tensors": [len(a), len(b)], "max_abs_diff": None, "bitwise": False}
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    return {"tensors": len(a), "max_abs_diff": diff, "bitwise": all(torch.equal(a[k], b[k]) for k in a)}


def markdown(r: dict) -> str:
    lines = ["# Mini SD tables from empty caches", "",
             "Each row distilled again by `proreflow distill` (the tables' own call) into a scratch folder with an "
             "empty `--pair-cache` shared by the rows in order, and its UNet compared with the student the tables "
             "scored.", "",
             "| row | seed | threads | UNet tensors | max abs diff | bitwise equal | pairs loaded / solved | distill, "
             "min (now) | distill, min (tables) |", "|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        lines.append(f"| {x['row']} | {x['seed']} | {x.get('threads', 2)} | {x['tensors']} | {x['max_abs_diff']} | "
                     f"{x['bitwise']} | {x['pair_cache']['loaded']:,} / {x['pair_cache']['solved']:,} | "
                     f"{x['seconds'] / 60:.1f} | {x['tables_seconds'] / 60:.1f} |")
    return "\n".join(lines + ["", f"Regenerate: `{r['command']}`.", ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, default=Path("runs/mini-sd-teacher"))
    ap.add_argument("--data", type=Path, default=Path("runs/mini-sd-data"))
    ap.add_argument("--runs", type=Path, default=Path("runs"), help="where the tables' students are")
    ap.add_argument("--row", action="append", default=[], help="a row of mini_sd_tables (repeatable; default: "
                    "ProReflow-I (full), then w/o aligned)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of each distill (default: the kept student's, from its time.json; a student "
                         "depends on its thread count, so only the same count can give it bitwise)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    by_name = {st.name: st for st in STUDENTS}
    names = args.row or ["ProReflow-I (full)", "w/o aligned"]
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"error: no row {unknown} in mini_sd_tables; rows: {sorted(by_name)}")
    scratch = Path(tempfile.mkdtemp(prefix="mini-sd-regen-"))
    rows = []
    try:
        for name in names:
            st, seed = by_name[name], args.seed
            scope = st.folder_scope(seed)
            kept = args.runs / st.root / scope
            record = student_record(args.runs / st.root, scope)
            if record is None:
                raise SystemExit(f"error: {kept} is not a finished student; run benchmarks/mini_sd_tables.py first")
            threads = args.threads or record["threads"]
            new, seconds = distill(f"{name}, seed {seed} (from empty caches)", scope, st.seed_changes(seed),
                                   args.teacher, args.data, scratch / "students", threads, scratch / "pairs")
            rows.append({"row": name, "seed": seed, "threads": threads, **compare(kept, new),
                         "seconds": round(seconds, 1),
                         "tables_seconds": record["seconds"],
                         "pair_cache": json.loads((new / "proreflow.json").read_text())["pair_cache"]})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {"rows": rows, "command": command_line("mini_sd_regen.py", sys.argv[1:])}
    print(write_results(args.results / "mini_sd_regen", result, markdown))


if __name__ == "__main__":
    main()
