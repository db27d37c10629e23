"""benchmarks/results_io.py: a benchmark's json and md, and the command printed under them."""

import json
import shlex

import pytest

from benchmark_module import load_benchmark


@pytest.fixture(scope="module")
def rio():
    return load_benchmark("results_io")


def test_json_then_md_into_a_new_folder(rio, tmp_path):
    stem = tmp_path / "new" / "deeper" / "bench"
    md = rio.write_results(stem, {"rows": [1, 2.5]}, lambda r: f"# {len(r['rows'])} rows\n", indent=2)
    assert md == "# 2 rows\n"
    assert json.loads((tmp_path / "new" / "deeper" / "bench.json").read_text()) == {"rows": [1, 2.5]}
    assert (tmp_path / "new" / "deeper" / "bench.json").read_text().endswith("\n")
    assert (tmp_path / "new" / "deeper" / "bench.md").read_text() == "# 2 rows\n"
    assert rio.write_results(tmp_path / "text", [3], "given\n") == "given\n"
    assert (tmp_path / "text.md").read_text() == "given\n"
    assert rio.write_results(tmp_path / "only", {"a": 1}) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "only.json", "text.json", "text.md"]


def test_a_failing_report_keeps_the_numbers_and_the_old_md(rio, tmp_path):
    rio.write_results(tmp_path / "b", {"v": 1}, "old\n")

    def broken(_):
        raise KeyError("missing")

    with pytest.raises(KeyError):
        rio.write_results(tmp_path / "b", {"v": 2}, broken)
    assert json.loads((tmp_path / "b.json").read_text()) == {"v": 2}  # the new numbers are on disk
    assert (tmp_path / "b.md").read_text() == "old\n"  # the md is the last whole one, not half of a new one
    assert not [p for p in tmp_path.iterdir() if p.name not in ("b.json", "b.md")]  # no temporary file left


def test_command_line_quotes_and_drops(rio):
    cmd = rio.command_line("x.py", ["--row", "w/o aligned", "--report-only", "--seed", "1"], drop=("--report-only",))
    assert cmd == ".venv/bin/python benchmarks/x.py --row 'w/o aligned' --seed 1"
    assert shlex.split(cmd)[2:] == ["--row", "w/o aligned", "--seed", "1"]
    assert rio.command_line("x.py", []) == ".venv/bin/python benchmarks/x.py"
