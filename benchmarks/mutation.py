"""Mutation testing of the algorithm core with mutmut (issue 27): how many small errors in the code the fast tests
catch. The scope and the tests are `[tool.mutmut]` in pyproject.toml: conventions, windows, time_sampling, losses,
solvers, pairs, sampling, fields/vp, schedulers/, training/recipe and training/plan, against the fast tests that
reach them (mutmut runs, per mutant, only the tests that cover the mutated function, and stops at the first failure).

A surviving mutant is either a gap in the tests (kill it with a test) or equivalent: it cannot change any result.
Equivalent mutants are listed, each with its reason, in `benchmarks/mutation_equivalent.json`. One kind is
recognised by rule and listed apart: a mutant whose only change is a `device` argument (`x.to(y.device, dtype)` ->
`x.to(None, dtype)` or `x.to(dtype)`, `device=d` -> `device=None` or dropped) moves nothing on a machine with one
device, where every tensor is already on it; a second device (a GPU) is needed to see it. The score leaves both out:

    score = (killed + timeout) / (killed + timeout + survived + no tests), equivalent and device-only excluded

    .venv/bin/pip install -e '.[mutation]'   # mutmut 3 (its result names are parsed); not a dependency
    .venv/bin/python benchmarks/mutation.py        # or `make mutation`; writes benchmarks/results/mutation.{json,md}
    .venv/bin/python benchmarks/mutation.py --report-only   # rescore what mutants/ holds (after a new test)
    .venv/bin/python benchmarks/mutation.py --report-only --recheck tests/test_core_edges.py
        # and apply each survivor's diff to a copy of src/ and run the named tests against it: a failing run
        # counts the mutant as "killed on recheck" (tests written after the run), recorded for later rescoring
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from results_io import write_results

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
EQUIVALENT = Path(__file__).parent / "mutation_equivalent.json"
MUTMUT = [str(Path(sys.executable).parent / "mutmut")]
_NAME = re.compile(r"^\s*(\S+__mutmut_\d+): (.+)$")
_MODULE = re.compile(r"^(.*?)\.x(?:_|ǁ)")
DETECTED = ("killed", "timeout", "caught by type check", "killed on recheck")
UNDETECTED = ("survived", "no tests")
#: mutmut's other outcomes ("not checked", "suspicious", "segfault", "skipped", interrupted): reported, not scored


def module_of(mutant: str) -> str:
    """`proreflow.losses.x_aligned__mutmut_1` and `proreflow.windows.xǁWindowScheduleǁuniform__mutmut_3` -> their
    module (mutmut 3 names functions x_<name> and methods xǁ<class>ǁ<name>)."""
    m = _MODULE.match(mutant)
    return m.group(1) if m else mutant.rsplit(".", 1)[0]


def statuses() -> dict[str, str]:
    out = subprocess.run([*MUTMUT, "results", "--all", "true"], cwd=ROOT, capture_output=True, text=True, check=True)
    found = {}
    for line in out.stdout.splitlines():
        m = _NAME.match(line)
        if m:
            found[m.group(1)] = m.group(2).strip()
    if not found:
        raise SystemExit("error: mutmut reports no mutants; run without --report-only first")
    return found


def diff(mutant: str) -> str:
    """The mutant's changed lines (mutmut show), without the file headers."""
    out = subprocess.run([*MUTMUT, "show", mutant], cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        return f"(mutmut show failed: {out.stderr.strip()[:200]})"
    return "\n".join(x for x in out.stdout.splitlines()
                     if x[:1] in ("+", "-") and not x.startswith(("+++", "---")))


_DEVICE_ARG = [re.compile(p) for p in (
    r"device\s*=\s*[\w.]+\s*,\s*", r",\s*device\s*=\s*[\w.]+", r"device\s*=\s*[\w.]+",  # device=... anywhere
    r"(?<=\.to\()[\w.]*device\s*,\s*", r"(?<=\.to\()None\s*,\s*",  # .to(x.device, dtype) / .to(None, dtype)
    r"(?<=\()[\w.]*\.device\s*,\s*", r"(?<=\()None\s*,\s*(?=[\w.]*dtype)",  # starts(t.device, ...)
    r"(?<=\.to\()[\w.]*\.device(?=\))", r"(?<=\.to\()None(?=\))")]  # .to(t.device) -> .to(None)


def _without_device(line: str) -> str:
    for pat in _DEVICE_ARG:
        line = pat.sub("", line)
    return re.sub(r"\s+|,(?=\s*\))", "", line)


def device_only(diff_text: str) -> bool:
    """True when the mutant changes nothing but a device argument (see the module docstring)."""
    minus = [x[1:] for x in diff_text.splitlines() if x.startswith("-")]
    plus = [x[1:] for x in diff_text.splitlines() if x.startswith("+")]
    if not minus or len(minus) != len(plus) or not any("device" in x for x in minus):
        return False
    return all(_without_device(a) == _without_device(b) for a, b in zip(minus, plus))


def recheck(mutant: str, diff_text: str, tests: list[str]) -> bool | None:
    """Whether `tests` fail with the mutant's change applied to a scratch copy of src/ (None: its lines are no
    longer in the source)."""
    import shutil
    import tempfile

    old = "\n".join(x[1:] for x in diff_text.splitlines() if x.startswith("-"))
    new = "\n".join(x[1:] for x in diff_text.splitlines() if x.startswith("+"))
    mod = module_of(mutant).replace(".", "/")
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(ROOT / "src", Path(tmp) / "src")
        path = next((p for p in (Path(tmp) / "src" / f"{mod}.py", Path(tmp) / "src" / mod / "__init__.py")
                     if p.is_file()), None)
        if path is None or old not in path.read_text():
            return None
        path.write_text(path.read_text().replace(old, new, 1))
        env = {**os.environ, "PYTHONPATH": str(Path(tmp) / "src"), "OMP_NUM_THREADS": "1"}
        run = subprocess.run([sys.executable, "-m", "pytest", *tests, "-x", "-q", "-p", "no:cacheprovider"],
                             cwd=ROOT, env=env, capture_output=True)
        return run.returncode != 0


def score(by_status: Counter) -> float | None:
    found = sum(by_status[s] for s in DETECTED)
    total = found + sum(by_status[s] for s in UNDETECTED)
    return found / total if total else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-children", type=int, default=2, help="parallel mutant processes (2 cores: 2)")
    ap.add_argument("--report-only", action="store_true", help="score the results mutants/ holds, run nothing")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--recheck", nargs="+", metavar="TEST", help="run these tests against each survivor's change")
    args = ap.parse_args()
    seconds = None
    if not args.report_only:
        started = time.perf_counter()
        # one torch thread per mutant process: the children share the cores between them
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        subprocess.run([*MUTMUT, "run", "--max-children", str(args.max_children)], cwd=ROOT, check=True, env=env)
        seconds = time.perf_counter() - started
    previous = args.results / "mutation.json"
    rechecked: dict[str, str] = {}
    if seconds is None and previous.is_file():  # rescoring the same mutants/: keep the run's own time and rechecks
        seconds = json.loads(previous.read_text()).get("seconds")
        rechecked = json.loads(previous.read_text()).get("rechecked", {})
    equivalent: dict[str, str] = json.loads(EQUIVALENT.read_text()) if EQUIVALENT.is_file() else {}
    found = statuses()
    stale = sorted(set(equivalent) - set(found))
    per_module: dict[str, Counter] = defaultdict(Counter)
    survivors: dict[str, list[tuple[str, str]]] = defaultdict(list)
    diffs: dict[str, str] = {}
    for name, status in sorted(found.items()):
        mod = module_of(name)
        if status in UNDETECTED or (status == "timeout" and name in equivalent):
            # a timeout that cannot be one (an equivalent mutant, e.g. one more bisection step) is not counted
            # as caught: it timed out for another reason (a paused or crowded machine)
            diffs[name] = diff(name)
            if name in equivalent:
                status = "equivalent"
            elif device_only(diffs[name]):
                status = "device-only"
            elif status == "survived" and args.recheck and name not in rechecked:
                if recheck(name, diffs[name], args.recheck):
                    rechecked[name] = " ".join(args.recheck)
            if status == "survived" and name in rechecked:
                status = "killed on recheck"
        per_module[mod][status] += 1
        if status in UNDETECTED or status in ("equivalent", "device-only"):
            survivors[mod].append((name, status))
    total = sum(per_module.values(), Counter())
    if score(total) is None:
        raise SystemExit(f"error: no mutant was tested ({dict(total)}); run `mutmut run` to its end first")
    result = {"seconds": seconds, "max_children": args.max_children, "total": dict(total), "score": score(total),
              "modules": {m: {**dict(c), "score": score(c)} for m, c in sorted(per_module.items())},
              "survivors": {m: [{"mutant": n, "status": s, "diff": diffs[n],
                                 **({"reason": equivalent[n]} if n in equivalent else {})} for n, s in xs]
                            for m, xs in sorted(survivors.items())},
              "stale_equivalents": stale, "rechecked": rechecked}
    print(write_results(args.results / "mutation", result, markdown).split("\n## Surviving")[0])


def _other(c: dict) -> int:
    return sum(v for k, v in c.items() if k not in (*DETECTED, *UNDETECTED, "equivalent", "device-only", "score"))


def markdown(r: dict) -> str:
    t = r["total"]
    when = f"{r['seconds'] / 60:.1f} min with {r['max_children']} mutant processes on 2 cores" if r["seconds"] else \
        "rescored from mutants/ (`--report-only`)"
    lines = ["# Mutation testing of the algorithm core", "",
             f"mutmut 3 over the modules of `[tool.mutmut]` in pyproject.toml, against the fast tests listed there "
             f"({when}). Score = (killed + timeout) / (killed + timeout + survived + no tests); equivalent mutants "
             "(each listed below with its reason, from `benchmarks/mutation_equivalent.json`) and device-only ones "
             "(only a `device` argument changed: invisible on one device, listed below) are left out. "
             "`raise ProReflowError(...)` statements are not mutated (their wording is not a result).", "",
             f"**Score: {100 * r['score']:.1f} %** of {sum(t.get(k, 0) for k in DETECTED + UNDETECTED)} scored "
             f"mutants ({t.get('killed', 0)} killed, {t.get('killed on recheck', 0)} killed on recheck, "
             f"{t.get('timeout', 0)} timed out, "
             f"{t.get('caught by type check', 0)} caught by type check, {t.get('survived', 0)} survived, "
             f"{t.get('no tests', 0)} reached by no test); {t.get('equivalent', 0)} equivalent, "
             f"{t.get('device-only', 0)} device-only and "
             f"{_other(t)} with another outcome (not checked, suspicious, ...) are not scored.", "",
             *([f"**Killed on recheck:** {t['killed on recheck']} mutants that survived mutmut's run fail tests "
                "written after it, run against each mutant's change applied to a copy of src/ (`--recheck "
                + " / ".join(sorted(set(r["rechecked"].values()))) + "`): "
                + ", ".join(f"`{n.split('.')[-1]}`" for n in r["rechecked"]) + f". Without them: "
                f"{100 * (1 - t['killed on recheck'] / sum(t.get(k, 0) for k in DETECTED + UNDETECTED)):.1f} %.",
                ""] if t.get("killed on recheck") else []),
             *([f"**Incomplete run:** {t['not checked']} mutants were not tested (the run was stopped before it "
                "reached them); a module's score covers only its tested mutants.", ""] if t.get("not checked") else []),
             "| module | killed + timeout | survived | no tests | equivalent | device-only | other | score |",
             "|---|---|---|---|---|---|---|---|"]
    for m, c in r["modules"].items():
        s = "-" if c["score"] is None else f"{100 * c['score']:.1f} %"
        lines.append(f"| {m} | {sum(c.get(k, 0) for k in DETECTED)} | {c.get('survived', 0)} | "
                     f"{c.get('no tests', 0)} | {c.get('equivalent', 0)} | {c.get('device-only', 0)} | {_other(c)} | "
                     f"{s} |")
    lines += ["", "## Surviving mutants", ""]
    for m, xs in r["survivors"].items():
        lines += [f"### {m}", ""]
        for x in xs:
            why = f" (equivalent: {x['reason']})" if "reason" in x else f" ({x['status']})"
            lines += [f"- `{x['mutant']}`{why}", "", "  ```diff", *[f"  {d}" for d in x["diff"].splitlines()],
                      "  ```", ""]
    if r["stale_equivalents"]:
        lines += ["Listed as equivalent but no longer a mutant (the code changed): " +
                  ", ".join(f"`{n}`" for n in r["stale_equivalents"]), ""]
    lines += ["Regenerate: `.venv/bin/python benchmarks/mutation.py` (mutmut installed in the venv).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
